// Package warm keeps firmware warm starts: a machine saved (QEMU's
// migration stream) at the moment its firmware first asked the network
// for something, with what its console showed and the frames it sent until
// then, so that every later guest of the same machine starts there instead
// of from reset (nbh matrix --warm). Under TCG a UEFI firmware's own start
// is seconds of every boot, the same in every row of its chain.
//
// A snapshot is found by its key (qemu.SnapshotKey: QEMU, its data files,
// the command line and the content of every file it names), so anything
// that changes what the machine did before its first request makes
// another one. The store is a folder (in the image cache); one snapshot
// per key, made by the first guest of a process that needs it while the
// others of its key wait, and never changed once in place (runs that share
// the store keep the first). Its files are read as untrusted input:
// bounded, regular files only.
package warm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"nbh.dev/nbh/internal/fsutil"
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
	last   string // why the last guest that was to make it did not
	cold   string // why this run starts its guests cold
}

// MaxWait bounds how long a guest waits for another to save its machine;
// after it, it starts cold.
var MaxWait = 3 * time.Minute

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

// Acquire is how a guest of key starts: from a snapshot (snap, its state
// linked or copied into the guest's folder dir, so that no later change to
// the store reaches it), by making it (maker: the guest starts from reset
// and saves itself at its first request on the network), or cold for the
// reason why (a machine that cannot be saved, guests that were to save it
// and did not). It waits, up to MaxWait, while another guest of this
// process makes the key's snapshot.
func (s *Store) Acquire(ctx context.Context, key, dir string) (snap *Snapshot, maker *Maker, why string, err error) {
	give := time.NewTimer(MaxWait)
	defer give.Stop()
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
			case <-give.C:
				return nil, nil, fmt.Sprintf("waited %s for another guest to save this machine", MaxWait), nil
			}
		}
		snap, err := s.load(key, dir)
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
		default:
			if _, serr := os.Stat(filepath.Join(s.dir, key, "meta.json")); !errors.Is(serr, os.ErrNotExist) {
				// A damaged snapshot: made again.
				os.RemoveAll(filepath.Join(s.dir, key))
			}
		}
		if e.tries >= maxTries {
			e.cold = fmt.Sprintf("%d guests were to save this machine and did not (the last: %s)", e.tries, e.last)
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
	meta.Format, meta.Key, meta.Frames, meta.Made = Format, m.key, len(frames), time.Now()
	if err := writeFrames(filepath.Join(m.tmp, "frames"), frames); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(m.tmp, "console"), console, 0o644); err != nil {
		return err
	}
	return m.commit(meta)
}

// commit writes meta.json last and moves the folder into place: a folder
// with meta.json is whole, and never changes once in place. Where another
// process put one first (a store two runs share), that one stays.
func (m *Maker) commit(meta Meta) error {
	b, _ := json.MarshalIndent(meta, "", "  ")
	if err := os.WriteFile(filepath.Join(m.tmp, "meta.json"), b, 0o644); err != nil {
		return err
	}
	final := filepath.Join(m.s.dir, m.key)
	if _, err := os.Stat(filepath.Join(final, "meta.json")); err == nil {
		os.RemoveAll(m.tmp)
		return nil
	}
	os.RemoveAll(final) // a damaged one
	if err := os.Rename(m.tmp, final); err != nil {
		os.RemoveAll(m.tmp)
		if _, serr := os.Stat(filepath.Join(final, "meta.json")); serr == nil {
			return nil // another process's, just now
		}
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

// Abandon gives up making the snapshot, for the reason why (the guest
// ended before its first request on the network, its state could not be
// written): the next guest of the key tries, up to a few times in a run.
// It reports whether this call gave up (false once saved or given up).
func (m *Maker) Abandon(why string) bool {
	gave := false
	m.once.Do(func() {
		gave = true
		os.RemoveAll(m.tmp)
		m.s.mu.Lock()
		m.e.last = why
		m.s.mu.Unlock()
		m.done(true)
	})
	return gave
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

// Broken records that snap did not restore (why: QEMU's words): it is
// removed (unless another has taken its place since), the guests of its
// key start cold for the rest of the run, and the next run makes it again.
func (s *Store) Broken(snap *Snapshot, why string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	dir := filepath.Join(s.dir, snap.Key)
	if b, err := os.ReadFile(filepath.Join(dir, "meta.json")); err == nil {
		var now Meta
		if json.Unmarshal(b, &now) == nil && now.Made.Equal(snap.Made) {
			os.RemoveAll(dir)
		}
	}
	e := s.keys[snap.Key]
	if e == nil {
		e = &entry{}
		s.keys[snap.Key] = e
	}
	e.cold = "its snapshot did not restore (" + why + "); it is made again next run"
}

// load reads key's snapshot, its state linked (or copied) into the folder
// pin. Its files are bounded: a store is a folder anyone with the cache
// can write.
func (s *Store) load(key, pin string) (*Snapshot, error) {
	dir := filepath.Join(s.dir, key)
	b, err := readBounded(filepath.Join(dir, "meta.json"), 1<<16)
	if err != nil {
		return nil, err
	}
	snap := &Snapshot{}
	if err := json.Unmarshal(b, &snap.Meta); err != nil || snap.Key != key || snap.Format != Format {
		return nil, fmt.Errorf("warm: %s: damaged meta.json, or another format", dir)
	}
	if snap.Cannot != "" {
		return snap, nil
	}
	if snap.Console, err = readBounded(filepath.Join(dir, "console"), maxConsole); err != nil {
		return nil, fmt.Errorf("warm: %s: %w", dir, err)
	}
	fb, err := readBounded(filepath.Join(dir, "frames"), maxFrames)
	if err != nil {
		return nil, fmt.Errorf("warm: %s: %w", dir, err)
	}
	if err := json.Unmarshal(fb, &snap.Frames); err != nil || len(snap.Frames) != snap.Meta.Frames || len(snap.Frames) == 0 {
		return nil, fmt.Errorf("warm: %s: damaged frames", dir)
	}
	snap.State = filepath.Join(pin, "warm-state")
	if err := pinFile(filepath.Join(dir, "state"), snap.State); err != nil {
		return nil, fmt.Errorf("warm: %s: %w", dir, err)
	}
	return snap, nil
}

// Bounds on a snapshot's small files.
const (
	maxConsole = 1 << 20 // console.MaxReplay
	maxFrames  = 8 << 20
)

// readBounded reads a regular file of at most max bytes.
func readBounded(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() || fi.Size() > max {
		return nil, fmt.Errorf("%s: not a regular file of at most %d bytes", path, max)
	}
	return io.ReadAll(io.LimitReader(f, max))
}

// pinFile makes dst the file src is now: a hard link where both are on one
// file system, else a copy. A regular file only (not a pipe that would
// hold QEMU's load).
func pinFile(src, dst string) error {
	fi, err := os.Lstat(src)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s: not a regular file", src)
	}
	os.Remove(dst)
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	return fsutil.CopyFile(src, dst)
}

// writeFrames writes frames as a JSON list (a few small frames).
func writeFrames(path string, frames [][]byte) error {
	b, err := json.Marshal(frames)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
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
