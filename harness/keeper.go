package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"nbh.dev/nbh/fixtures"
	"nbh.dev/nbh/harness/archive"
	"nbh.dev/nbh/harness/archive/manifest"
	"nbh.dev/nbh/harness/bootfile"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/harness/uki"
	"nbh.dev/nbh/images"
)

// keeper is a guest's reference archive on the boot server, kept current
// the way a boot server for network roots must: before each fetch of the
// archive it compares the archive's manifest with the guest's root, and on
// drift rebuilds it (through the content-addressed cache) and swaps it in
// with one rename, so a download in flight finishes with the whole old
// archive and the next gets the whole new one. Refresh off leaves a stale
// archive stale, which is how one is produced.
type keeper struct {
	g       *Guest
	k       *images.Kernel
	opts    fixtures.Options
	refresh bool
	served  string // where loaders fetch it; "" on the direct chain
	// pack, when set, serves the archive inside another file (a Unified
	// Kernel Image) and says where in it the archive lies.
	pack func(ctx context.Context, archive, dst string) (uki.Layout, error)

	mu  sync.Mutex
	cur *archive.Result
	at  uki.Layout // where the archive lies in the served file
}

// build (re)builds the archive and serves it; cause goes on the timeline.
// Called with mu held.
func (kp *keeper) build(ctx context.Context, kind, cause string) error {
	start := time.Now()
	res, err := fixtures.Reference(ctx, kp.g.lab.cache, kp.k, kp.opts)
	if err != nil {
		return err
	}
	fi, err := os.Stat(res.Path)
	if err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	size := fi.Size()
	switch {
	case kp.pack != nil:
		if kp.at, err = kp.pack(ctx, res.Path, kp.served); err != nil {
			return fmt.Errorf("lab: serve the archive: %w", err)
		}
	case kp.served != "":
		if err := place(res.Path, kp.served); err != nil {
			return fmt.Errorf("lab: serve the archive: %w", err)
		}
		kp.at = uki.Layout{Size: size}
		if kp.g.plan.sign {
			key, err := kp.g.lab.signingKey(ctx)
			if err != nil {
				return err
			}
			if err := key.Sign(ctx, kp.served); err != nil {
				return err
			}
		}
	}
	kp.cur = res
	kp.g.lab.tl.Emit(timeline.Event{Source: "archive", Kind: kind, Guest: kp.g.Name,
		Msg: fmt.Sprintf("%s (%s, %d bytes, %s)", cause, res.Key[:12], size, res.Manifest.Compression),
		Detail: map[string]any{"key": res.Key, "cached": res.Cached, "bytes": size, "seconds": time.Since(start).Seconds(),
			"tracked": len(res.Manifest.Tracked()), "kernel": res.Manifest.Kernel}})
	return nil
}

// path is the archive as built now.
func (kp *keeper) path() string {
	kp.mu.Lock()
	defer kp.mu.Unlock()
	return kp.cur.Path
}

// drift compares the current archive with the guest's root. Called with mu
// held.
func (kp *keeper) drift() ([]manifest.Drift, error) {
	if kp.opts.Root == "" {
		return nil, nil
	}
	return manifest.Check(kp.cur.Manifest, kp.g.rootFS.FS())
}

// fresh makes sure the archive about to be fetched matches the root, when
// refresh is on.
func (kp *keeper) fresh(ctx context.Context) error {
	if !kp.refresh {
		return nil
	}
	kp.mu.Lock()
	defer kp.mu.Unlock()
	drift, err := kp.drift()
	if err != nil || len(drift) == 0 {
		return err
	}
	var why []string
	for _, d := range drift {
		why = append(why, d.String())
	}
	return kp.build(ctx, "rebuild", "root changed: "+strings.Join(why, "; "))
}

// edit changes the guest's root configuration, as an administrator would.
func (kp *keeper) edit(line string) error {
	root := kp.g.rootFS // the guest's root tree, opened with it
	// The reference root's configuration, or the first editable file (else
	// the first file) of a user's root the archive carries.
	p := strings.TrimPrefix(fixtures.ConfigPath, "/")
	if t := kp.opts.Tracked; len(t) > 0 {
		p = strings.TrimPrefix(t[0].Path, "/")
		for _, e := range t {
			if e.Editable {
				p = strings.TrimPrefix(e.Path, "/")
				break
			}
		}
	}
	old, err := root.ReadFile(p)
	if err != nil {
		return err
	}
	if err := root.WriteFile(p, append(old, line+"\n"...), 0o644); err != nil {
		return err
	}
	kp.g.lab.tl.Emit(timeline.Event{Source: "lab", Kind: "root-edit", Guest: kp.g.Name,
		Msg: fmt.Sprintf("/%s on the guest's root: added %q", p, line)})
	return nil
}

// serve wraps a fetch of the archive as the guest's faults say: damaged in
// transit, or rebuilt while it is being downloaded.
func (kp *keeper) serve(f *bootfile.File) *bootfile.File {
	p := kp.g.plan
	// Damage lands in the archive, wherever it lies in the served file.
	kp.mu.Lock()
	in := kp.at
	kp.mu.Unlock()
	if in.Offset+in.Size > f.Size() || in.Size == 0 {
		in = uki.Layout{Size: f.Size()}
	}
	switch {
	case p.truncate:
		at, size := in.Offset+in.Size/2, f.Size()
		return bootfile.Wrap(f, &cutOnRead{r: bootfile.Truncated(f, at), cut: func() {
			kp.g.lab.tl.Emit(timeline.Event{Source: "lab", Kind: "fired", Guest: kp.g.Name, Stage: timeline.Loader,
				Msg:    fmt.Sprintf("truncated-archive: the archive broke off at %d of %d bytes", at, size),
				Detail: map[string]any{"fault": "truncated-archive", "at": at, "size": size}})
		}})
	case p.stall:
		at, size := in.Offset+in.Size/2, f.Size()
		b := kp.g.current()
		return bootfile.Wrap(f, bootfile.Stalled(b.ctx, f, at, func() {
			kp.g.lab.tl.Emit(timeline.Event{Source: "lab", Kind: "fired", Guest: kp.g.Name,
				Msg:    fmt.Sprintf("stalled-transfer: the archive stopped at %d of %d bytes, the transfer left open", at, size),
				Detail: map[string]any{"fault": "stalled-transfer", "at": at, "size": size}})
		}))
	case p.tamper:
		// Changed after signing: the signature no longer matches.
		return bootfile.Wrap(f, bootfile.BitFlip(f, in.Offset+in.Size/2))
	case p.corrupt:
		// Near the end: in the modules, after /init, so the damage is
		// the unpacker's or the init's integrity check's to find, not a
		// crash of a damaged init.
		return bootfile.Wrap(f, bootfile.BitFlip(f, in.Offset+in.Size*19/20))
	case p.swap:
		return bootfile.Wrap(f, &swapOnRead{r: f, at: in.Offset + in.Size/4, swap: kp.swap})
	}
	return f
}

// swap rebuilds the archive mid-download: the root changes, and the keeper,
// refresh on, rebuilds and renames the new archive into place.
func (kp *keeper) swap() {
	if err := kp.edit("swapped=during-download"); err != nil {
		kp.g.lab.tl.Emit(timeline.Event{Source: "lab", Kind: "error", Guest: kp.g.Name, Msg: "archive-swap: " + err.Error()})
		return
	}
	if err := kp.fresh(kp.g.lab.ctx); err != nil {
		kp.g.lab.tl.Emit(timeline.Event{Source: "lab", Kind: "error", Guest: kp.g.Name, Msg: "archive-swap: " + err.Error()})
	}
}

// cutOnRead reports, once, that a truncated download broke off.
type cutOnRead struct {
	r    io.ReaderAt
	once sync.Once
	cut  func()
}

func (c *cutOnRead) ReadAt(b []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(b, off)
	if errors.Is(err, bootfile.ErrCut) {
		c.once.Do(c.cut)
	}
	return n, err
}

// swapOnRead runs swap once, synchronously, when the download first reads
// past at: the transfer is then surely in flight.
type swapOnRead struct {
	r    io.ReaderAt
	at   int64
	once sync.Once
	swap func()
}

func (s *swapOnRead) ReadAt(b []byte, off int64) (int, error) {
	if off+int64(len(b)) > s.at {
		s.once.Do(s.swap)
	}
	return s.r.ReadAt(b, off)
}
