package warm

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"
)

// save plays a maker: QEMU's state file, then Save.
func save(t *testing.T, m *Maker, state string) {
	t.Helper()
	assert.NilError(t, os.WriteFile(m.StatePath(), []byte(state), 0o644))
	assert.NilError(t, m.Save(Meta{Machine: "arm64/aavmf-http", Firmware: 5 * time.Second}, []byte("UEFI firmware\r\n"), [][]byte{{1, 2}, {3}}))
}

// Of the guests of one key that start together, one makes the snapshot and
// the others wait for it and start from it; a later store (another run)
// finds it.
func TestOneMakerTheOthersWait(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	assert.NilError(t, err)
	ctx := context.Background()
	_, m, why, err := s.Acquire(ctx, "k1")
	assert.NilError(t, err)
	assert.Equal(t, why, "")
	assert.Assert(t, m != nil, "the first guest makes it")

	var wg sync.WaitGroup
	got := make([]*Snapshot, 3)
	for i := range got {
		wg.Add(1)
		go func() {
			defer wg.Done()
			snap, m2, _, err := s.Acquire(ctx, "k1")
			assert.Check(t, err)
			assert.Check(t, m2 == nil, "a second maker")
			got[i] = snap
		}()
	}
	time.Sleep(100 * time.Millisecond)
	for _, g := range got {
		assert.Assert(t, g == nil, "a guest started before the snapshot was saved")
	}
	save(t, m, "STATE")
	wg.Wait()
	for _, g := range got {
		assert.Assert(t, g != nil)
		b, err := os.ReadFile(g.State)
		assert.NilError(t, err)
		assert.Equal(t, string(b), "STATE")
		assert.DeepEqual(t, g.Frames, [][]byte{{1, 2}, {3}})
		assert.Equal(t, string(g.Console), "UEFI firmware\r\n")
		assert.Equal(t, g.Firmware, 5*time.Second)
	}

	s2, err := Open(dir)
	assert.NilError(t, err)
	snap, m, _, err := s2.Acquire(ctx, "k1")
	assert.NilError(t, err)
	assert.Assert(t, m == nil && snap != nil, "the next run makes it again")
	snap, m, _, err = s2.Acquire(ctx, "k2")
	assert.NilError(t, err)
	assert.Assert(t, snap == nil && m != nil, "another key shares it")
	m.Abandon()
}

// A guest that ends before its first request gives up: the next guest of
// the key makes it; after a few such guests the run starts its guests cold
// and says why.
func TestAbandonedThenCold(t *testing.T) {
	s, err := Open(t.TempDir())
	assert.NilError(t, err)
	ctx := context.Background()
	for i := 0; i < maxTries; i++ {
		snap, m, why, err := s.Acquire(ctx, "k")
		assert.NilError(t, err)
		assert.Assert(t, snap == nil && m != nil && why == "", "try %d", i)
		m.Abandon()
		m.Abandon() // twice is once
	}
	snap, m, why, err := s.Acquire(ctx, "k")
	assert.NilError(t, err)
	assert.Assert(t, snap == nil && m == nil)
	assert.Check(t, is.Contains(why, "ended before"))
	ents, _ := os.ReadDir(s.Dir())
	assert.Equal(t, len(ents), 0, "a making folder left")
}

// A machine QEMU cannot save starts cold, in this run and the next, and
// says QEMU's reason.
func TestCannotIsKept(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	assert.NilError(t, err)
	ctx := context.Background()
	_, m, _, err := s.Acquire(ctx, "k")
	assert.NilError(t, err)
	m.Cannot(Meta{}, "State blocked by non-migratable device 'x'")
	_, m, why, err := s.Acquire(ctx, "k")
	assert.NilError(t, err)
	assert.Assert(t, m == nil)
	assert.Equal(t, why, "State blocked by non-migratable device 'x'")
	s2, _ := Open(dir)
	_, m, why, err = s2.Acquire(ctx, "k")
	assert.NilError(t, err)
	assert.Assert(t, m == nil)
	assert.Equal(t, why, "State blocked by non-migratable device 'x'")
}

// A damaged snapshot, one of another format, and one that did not restore
// (Forget) are made again.
func TestDamagedIsMadeAgain(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	assert.NilError(t, err)
	ctx := context.Background()
	for _, damage := range []func(){
		func() { os.Remove(filepath.Join(dir, "k", "state")) },
		func() { os.WriteFile(filepath.Join(dir, "k", "frames"), []byte("[]"), 0o644) },
		func() {
			os.WriteFile(filepath.Join(dir, "k", "meta.json"), []byte(`{"format": 1, "key": "k"}`), 0o644)
		},
		func() { s.Forget("k") },
	} {
		_, m, _, err := s.Acquire(ctx, "k")
		assert.NilError(t, err)
		assert.Assert(t, m != nil)
		save(t, m, "S")
		snap, _, _, err := s.Acquire(ctx, "k")
		assert.NilError(t, err)
		assert.Assert(t, snap != nil)
		damage()
	}
	_, m, _, err := s.Acquire(ctx, "k")
	assert.NilError(t, err)
	assert.Assert(t, m != nil)
	m.Abandon()
}

// A waiting guest stops waiting when its context ends.
func TestWaitEndsWithContext(t *testing.T) {
	s, err := Open(t.TempDir())
	assert.NilError(t, err)
	_, m, _, err := s.Acquire(context.Background(), "k")
	assert.NilError(t, err)
	defer m.Abandon()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, _, _, err = s.Acquire(ctx, "k")
	assert.ErrorIs(t, err, context.DeadlineExceeded)
}

// The store keeps to its size: the least recently used snapshots go.
func TestTrimKeepsTheRecentlyUsed(t *testing.T) {
	s, err := Open(t.TempDir())
	assert.NilError(t, err)
	s.MaxBytes = 2500
	ctx := context.Background()
	big := string(make([]byte, 1000))
	for i, k := range []string{"a", "b"} {
		_, m, _, err := s.Acquire(ctx, k)
		assert.NilError(t, err)
		save(t, m, big)
		old := time.Now().Add(time.Duration(i-10) * time.Hour)
		os.Chtimes(filepath.Join(s.Dir(), k), old, old)
	}
	// a is used now: b is the least recently used.
	snap, _, _, err := s.Acquire(ctx, "a")
	assert.NilError(t, err)
	assert.Assert(t, snap != nil)
	_, m, _, err := s.Acquire(ctx, "c")
	assert.NilError(t, err)
	save(t, m, big)
	for k, want := range map[string]bool{"a": true, "b": false, "c": true} {
		_, err := os.Stat(filepath.Join(s.Dir(), k, "meta.json"))
		assert.Equal(t, err == nil, want, "snapshot %s", k)
	}
}
