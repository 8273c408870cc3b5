package warm

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"syscall"
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
	_, m, why, err := s.Acquire(ctx, "k1", t.TempDir())
	assert.NilError(t, err)
	assert.Equal(t, why, "")
	assert.Assert(t, m != nil, "the first guest makes it")

	var wg sync.WaitGroup
	got := make([]*Snapshot, 3)
	for i := range got {
		wg.Add(1)
		go func() {
			defer wg.Done()
			snap, m2, _, err := s.Acquire(ctx, "k1", t.TempDir())
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
		assert.Equal(t, string(b), "STATE", "the state pinned in the guest's folder")
		assert.DeepEqual(t, g.Frames, [][]byte{{1, 2}, {3}})
		assert.Equal(t, string(g.Console), "UEFI firmware\r\n")
		assert.Equal(t, g.Firmware, 5*time.Second)
	}

	s2, err := Open(dir)
	assert.NilError(t, err)
	snap, m, _, err := s2.Acquire(ctx, "k1", t.TempDir())
	assert.NilError(t, err)
	assert.Assert(t, m == nil && snap != nil, "the next run restores it")
	snap, m, _, err = s2.Acquire(ctx, "k2", t.TempDir())
	assert.NilError(t, err)
	assert.Assert(t, snap == nil && m != nil, "another key does not share it")
	m.Abandon("test")
}

// A guest that ends before its first request gives up: the next guest of
// the key makes it; after a few such guests the run starts its guests cold
// and says why.
func TestAbandonedThenCold(t *testing.T) {
	s, err := Open(t.TempDir())
	assert.NilError(t, err)
	ctx := context.Background()
	for i := 0; i < maxTries; i++ {
		snap, m, why, err := s.Acquire(ctx, "k", t.TempDir())
		assert.NilError(t, err)
		assert.Assert(t, snap == nil && m != nil && why == "", "try %d", i)
		assert.Assert(t, m.Abandon("it ended before its first request"))
		assert.Assert(t, !m.Abandon("again"), "twice is once")
	}
	snap, m, why, err := s.Acquire(ctx, "k", t.TempDir())
	assert.NilError(t, err)
	assert.Assert(t, snap == nil && m == nil)
	assert.Check(t, is.Contains(why, "2 guests were to save this machine and did not (the last: it ended before its first request)"))
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
	_, m, _, err := s.Acquire(ctx, "k", t.TempDir())
	assert.NilError(t, err)
	m.Cannot(Meta{}, "State blocked by non-migratable device 'x'")
	_, m, why, err := s.Acquire(ctx, "k", t.TempDir())
	assert.NilError(t, err)
	assert.Assert(t, m == nil)
	assert.Equal(t, why, "State blocked by non-migratable device 'x'")
	s2, _ := Open(dir)
	_, m, why, err = s2.Acquire(ctx, "k", t.TempDir())
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
		func() {
			snap, _, _, err := s.Acquire(ctx, "k", t.TempDir())
			assert.NilError(t, err)
			s.Broken(snap, "test")
			s.keys["k"].cold = "" // the next run
		},
	} {
		_, m, _, err := s.Acquire(ctx, "k", t.TempDir())
		assert.NilError(t, err)
		assert.Assert(t, m != nil)
		save(t, m, "S")
		snap, _, _, err := s.Acquire(ctx, "k", t.TempDir())
		assert.NilError(t, err)
		assert.Assert(t, snap != nil)
		damage()
	}
	_, m, _, err := s.Acquire(ctx, "k", t.TempDir())
	assert.NilError(t, err)
	assert.Assert(t, m != nil)
	m.Abandon("test")
}

// A waiting guest stops waiting when its context ends.
func TestWaitEndsWithContext(t *testing.T) {
	s, err := Open(t.TempDir())
	assert.NilError(t, err)
	_, m, _, err := s.Acquire(context.Background(), "k", t.TempDir())
	assert.NilError(t, err)
	defer m.Abandon("test")
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, _, _, err = s.Acquire(ctx, "k", t.TempDir())
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
		_, m, _, err := s.Acquire(ctx, k, t.TempDir())
		assert.NilError(t, err)
		save(t, m, big)
		old := time.Now().Add(time.Duration(i-10) * time.Hour)
		os.Chtimes(filepath.Join(s.Dir(), k), old, old)
	}
	// a is used now: b is the least recently used.
	snap, _, _, err := s.Acquire(ctx, "a", t.TempDir())
	assert.NilError(t, err)
	assert.Assert(t, snap != nil)
	_, m, _, err := s.Acquire(ctx, "c", t.TempDir())
	assert.NilError(t, err)
	save(t, m, big)
	for k, want := range map[string]bool{"a": true, "b": false, "c": true} {
		_, err := os.Stat(filepath.Join(s.Dir(), k, "meta.json"))
		assert.Equal(t, err == nil, want, "snapshot %s", k)
	}
}

// Two runs sharing a store: a snapshot in place is never replaced (the
// second maker's goes), a guest keeps the state it was given whatever
// happens to the store after, and a snapshot that did not restore removes
// only itself, not one made since.
func TestSharedStore(t *testing.T) {
	dir := t.TempDir()
	s1, _ := Open(dir)
	s2, _ := Open(dir)
	ctx := context.Background()
	_, m1, _, err := s1.Acquire(ctx, "k", t.TempDir())
	assert.NilError(t, err)
	_, m2, _, err := s2.Acquire(ctx, "k", t.TempDir())
	assert.NilError(t, err)
	save(t, m1, "ONE")
	save(t, m2, "TWO")
	pin := t.TempDir()
	snap, _, _, err := s2.Acquire(ctx, "k", pin)
	assert.NilError(t, err)
	b, _ := os.ReadFile(snap.State)
	assert.Equal(t, string(b), "ONE", "the first one in place stays")

	// The store changes under the guest: it keeps its state.
	os.RemoveAll(filepath.Join(dir, "k"))
	b, err = os.ReadFile(snap.State)
	assert.NilError(t, err)
	assert.Equal(t, string(b), "ONE")

	// Another run makes it again; the old snapshot's failure leaves it.
	s3, _ := Open(dir)
	_, m3, _, err := s3.Acquire(ctx, "k", t.TempDir())
	assert.NilError(t, err)
	time.Sleep(10 * time.Millisecond) // another Made
	save(t, m3, "THREE")
	s2.Broken(snap, "load failed")
	_, err = os.Stat(filepath.Join(dir, "k", "meta.json"))
	assert.NilError(t, err, "a newer snapshot removed")
	_, _, why, err := s2.Acquire(ctx, "k", t.TempDir())
	assert.NilError(t, err)
	assert.Check(t, is.Contains(why, "did not restore (load failed)"))
}

// A store's files are not trusted: a state that is no regular file, and
// oversized console, are a damaged snapshot, made again.
func TestHostileStore(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir)
	ctx := context.Background()
	_, m, _, _ := s.Acquire(ctx, "k", t.TempDir())
	save(t, m, "S")
	state := filepath.Join(dir, "k", "state")
	os.Remove(state)
	assert.NilError(t, syscall.Mkfifo(state, 0o644))
	snap, m, _, err := s.Acquire(ctx, "k", t.TempDir())
	assert.NilError(t, err)
	assert.Assert(t, snap == nil && m != nil, "a pipe as the state")
	save(t, m, "S")
	assert.NilError(t, os.WriteFile(filepath.Join(dir, "k", "console"), make([]byte, maxConsole+1), 0o644))
	snap, m, _, err = s.Acquire(ctx, "k", t.TempDir())
	assert.NilError(t, err)
	assert.Assert(t, snap == nil && m != nil, "an oversized console")
	m.Abandon("test")
}
