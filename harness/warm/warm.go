// Package warm keeps firmware warm starts: a machine saved (QEMU's
// migration stream) at the moment its firmware first spoke on the network,
// with what its console showed and the frames it sent until then, so that
// every later guest of the same machine starts there instead of from reset
// (nbh matrix --warm). Under TCG a UEFI firmware's own start is seconds of
// every boot, the same in every row of its chain.
//
// A snapshot is found by its key (qemu.SnapshotKey: QEMU, its data files,
// the command line and the content of every file it names), so anything
// that changes what the machine did before its first request on the network makes another
// one. The store is a folder (in the image cache); one snapshot per key,
// made by the first guest that needs it while the others of its key wait.
package warm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"
)

// Format is the version of how snapshots are made and kept: a snapshot of
// another format is made again (a different moment to save at is another
// machine state, under the same key).
const Format = 2

// Meta describes a snapshot.
type Meta struct {
	Format  int       `json:"format"`
	Key     string    `json:"key"`
	Machine string    `json:"machine"` // the chain's QEMU profile, for people
	QEMU    string    `json:"qemu"`    // its version line
	Made    time.Time `json:"made"`
	// Firmware is how long the machine ran from QEMU's start to its first
	// frame: what each restored guest does not run again.
	Firmware time.Duration `json:"firmware_ns"`
	Frames   int           `json:"frames"`
	// Cannot, when set, says why this machine cannot be saved and
	// restored (QEMU's reason): its guests start cold.
	Cannot string `json:"cannot,omitempty"`
}

// Snapshot is a saved machine.
type Snapshot struct {
	Meta
	State   string   // QEMU's saved state (Config.Incoming)
	Console []byte   // the console's raw stream before it was saved
	Frames  [][]byte // what the machine sent before it was saved, in order
}

// Store is a folder of snapshots.
type Store struct {
	dir string
	// MaxBytes bounds the folder: after a snapshot is saved the least
	// recently used ones go until the rest fit. 0: DefaultMaxBytes.
	MaxBytes int64

	mu   sync.Mutex
	keys map[string]*entry
}

// DefaultMaxBytes bounds a store: a UEFI machine's state is 20-60 MiB.
const DefaultMaxBytes = 4 << 30

// maxTries is how many guests of a key may try to make its snapshot in a
// run (each a guest that ended before its first request on the network).
const maxTries = 2

type entry struct {
	making chan struct{} // closed when the guest making it is done
	tries  int
	cold   string // why this run starts its guests cold
}

// Open opens (creating) the store in dir.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("warm: %w", err)
	}
	// A run that was killed while saving a machine left its folder.
	if old, _ := filepath.Glob(filepath.Join(dir, ".making-*")); len(old) > 0 {
		for _, p := range old {
			if fi, err := os.Stat(p); err == nil && time.Since(fi.ModTime()) > time.Hour {
				os.RemoveAll(p)
			}
		}
	}
	return &Store{dir: dir, keys: map[string]*entry{}}, nil
}

// Dir is the store's folder.
func (s *Store) Dir() string { return s.dir }

// Maker is the right, and duty, to make a key's snapshot: Save or Abandon
// it (either ends the wait of the guests of its key).
type Maker struct {
	s    *Store
	key  string
	e    *entry
	tmp  string
	once sync.Once
}

// StatePath is where QEMU writes the machine's state (Process.SaveState).
func (m *Maker) StatePath() string { return filepath.Join(m.tmp, "state") }

// Acquire is how a guest of key starts: from a snapshot (snap), by making
// it (maker: the guest starts cold and saves itself at its first request on the network),
// or cold for the reason why (a machine that cannot be saved, guests that
// never spoke). It waits while another guest makes the key's snapshot.
func (s *Store) Acquire(ctx context.Context, key string) (snap *Snapshot, maker *Maker, why string, err error) {
	for {
		s.mu.Lock()
		e := s.keys[key]
		if e == nil {
			e = &entry{}
			s.keys[key] = e
		}
		if e.cold != "" {
			s.mu.Unlock()
			return nil, nil, e.cold, nil
		}
		if wait := e.making; wait != nil {
			s.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return nil, nil, "", ctx.Err()
			}
		}
		snap, err := s.load(key)
		switch {
		case err == nil && snap.Cannot != "":
			e.cold = snap.Cannot
			s.mu.Unlock()
			return nil, nil, snap.Cannot, nil
		case err == nil:
			s.mu.Unlock()
			now := time.Now()
			os.Chtimes(filepath.Join(s.dir, key), now, now) // recently used
			return snap, nil, "", nil
		case !errors.Is(err, os.ErrNotExist):
			// A damaged snapshot: made again.
			os.RemoveAll(filepath.Join(s.dir, key))
		}
		if e.tries >= maxTries {
			e.cold = fmt.Sprintf("the %d guests that were to save this machine ended before its first request on the network", e.tries)
			s.mu.Unlock()
			return nil, nil, e.cold, nil
		}
		tmp, err := os.MkdirTemp(s.dir, ".making-")
		if err != nil {
			s.mu.Unlock()
			return nil, nil, "", fmt.Errorf("warm: %w", err)
		}
		e.making = make(chan struct{})
		s.mu.Unlock()
		return nil, &Maker{s: s, key: key, e: e, tmp: tmp}, "", nil
	}
}

// Save keeps the snapshot whose state QEMU wrote to StatePath, with the
// console's stream and the frames sent before it.
func (m *Maker) Save(meta Meta, console []byte, frames [][]byte) error {
	err := errors.New("warm: already saved or abandoned")
	m.once.Do(func() {
		err = m.save(meta, console, frames)
		if err != nil {
			os.RemoveAll(m.tmp)
		}
		m.done(err != nil)
	})
	if err == nil {
		m.s.trim()
	}
	return err
}

func (m *Maker) save(meta Meta, console []byte, frames [][]byte) error {
	meta.Format, meta.Key, meta.Frames = Format, m.key, len(frames)
	if err := writeFrames(filepath.Join(m.tmp, "frames"), frames); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(m.tmp, "console"), console, 0o644); err != nil {
		return err
	}
	return m.commit(meta)
}

// commit writes meta.json last and moves the folder into place: a folder
// with meta.json is whole.
func (m *Maker) commit(meta Meta) error {
	b, _ := json.MarshalIndent(meta, "", "  ")
	if err := os.WriteFile(filepath.Join(m.tmp, "meta.json"), b, 0o644); err != nil {
		return err
	}
	final := filepath.Join(m.s.dir, m.key)
	os.RemoveAll(final)
	if err := os.Rename(m.tmp, final); err != nil {
		return fmt.Errorf("warm: %w", err)
	}
	return nil
}

// Cannot records that the machine cannot be saved or restored (why: QEMU's
// reason): its guests start cold, in this run and later ones, until its key
// changes.
func (m *Maker) Cannot(meta Meta, why string) {
	m.once.Do(func() {
		meta.Format, meta.Key, meta.Cannot = Format, m.key, why
		os.Remove(m.StatePath())
		if err := m.commit(meta); err != nil {
			os.RemoveAll(m.tmp)
		}
		m.s.mu.Lock()
		m.e.cold = why
		m.s.mu.Unlock()
		m.done(false)
	})
}

// Abandon gives up making the snapshot (the guest ended before its first
// frame, or its state could not be written): the next guest of the key
// tries, up to a few times in a run.
func (m *Maker) Abandon() {
	m.once.Do(func() {
		os.RemoveAll(m.tmp)
		m.done(true)
	})
}

func (m *Maker) done(failed bool) {
	m.s.mu.Lock()
	if failed {
		m.e.tries++
	}
	close(m.e.making)
	m.e.making = nil
	m.s.mu.Unlock()
}

// Forget removes a snapshot that could not be restored; the key's next
// guest makes it again.
func (s *Store) Forget(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	os.RemoveAll(filepath.Join(s.dir, key))
}

// load reads key's snapshot.
func (s *Store) load(key string) (*Snapshot, error) {
	dir := filepath.Join(s.dir, key)
	b, err := os.ReadFile(filepath.Join(dir, "meta.json"))
	if err != nil {
		return nil, err
	}
	snap := &Snapshot{State: filepath.Join(dir, "state")}
	if err := json.Unmarshal(b, &snap.Meta); err != nil || snap.Key != key || snap.Format != Format {
		return nil, fmt.Errorf("warm: %s: damaged meta.json, or another format", dir)
	}
	if snap.Cannot != "" {
		return snap, nil
	}
	if _, err := os.Stat(snap.State); err != nil {
		return nil, fmt.Errorf("warm: %s: %w", dir, err)
	}
	if snap.Console, err = os.ReadFile(filepath.Join(dir, "console")); err != nil {
		return nil, fmt.Errorf("warm: %s: %w", dir, err)
	}
	if snap.Frames, err = readFrames(filepath.Join(dir, "frames")); err != nil || len(snap.Frames) != snap.Meta.Frames {
		return nil, fmt.Errorf("warm: %s: damaged frames", dir)
	}
	return snap, nil
}

// writeFrames writes frames as a JSON list (a few small frames).
func writeFrames(path string, frames [][]byte) error {
	b, err := json.Marshal(frames)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

func readFrames(path string) ([][]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var frames [][]byte
	err = json.Unmarshal(b, &frames)
	return frames, err
}

// trim removes the least recently used snapshots until the store fits
// MaxBytes.
func (s *Store) trim() {
	max := s.MaxBytes
	if max <= 0 {
		max = DefaultMaxBytes
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return
	}
	type snapDir struct {
		name string
		used time.Time
		size int64
	}
	var all []snapDir
	var total int64
	for _, e := range ents {
		if !e.IsDir() || e.Name()[0] == '.' || s.keys[e.Name()] != nil && s.keys[e.Name()].making != nil {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue
		}
		var size int64
		filepath.WalkDir(filepath.Join(s.dir, e.Name()), func(_ string, d os.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				if i, err := d.Info(); err == nil {
					size += i.Size()
				}
			}
			return nil
		})
		all = append(all, snapDir{e.Name(), fi.ModTime(), size})
		total += size
	}
	sort.Slice(all, func(i, j int) bool { return all[i].used.Before(all[j].used) })
	for _, d := range all {
		if total <= max {
			break
		}
		os.RemoveAll(filepath.Join(s.dir, d.name))
		total -= d.size
	}
}
