package harness

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
	"syscall"
	"time"

	"nbh.dev/nbh/harness/archive"
	"nbh.dev/nbh/harness/archive/manifest"
	"nbh.dev/nbh/harness/timeline"
)

// The server's own staleness diagnosis, for any archive and any init: when
// a guest mounts its NFS root, the lab compares the archive it served that
// guest with the root it mounts — every member that is a regular file in
// both must hold the same bytes — and a mismatch is a "stale-archive" event
// naming the files. It needs nothing from the guest's init, so it holds
// for initramfs-tools' and dracut's archives as for nbh's.

// What the server compares. An archive of nbh's says which of its members
// are copies of the root (its manifest, /etc/nbh/manifest.json, gives their
// root paths). For anyone else's, the members whose kind an archive builder
// copies verbatim from the root: configuration (etc), kernel modules and
// firmware; binaries are left out, since builders put their own under the
// same names (initramfs-tools' klibc cat is not the root's /usr/bin/cat).
var copied = []string{"etc/", "lib/modules/", "usr/lib/modules/", "lib/firmware/", "usr/lib/firmware/"}

// generated are members of those folders an archive builder writes itself
// (a linker cache for its own libraries, module indexes for its own
// modules, an empty fstab, dracut's users): they differ from the root's by
// design.
var generated = []string{
	"etc/ld.so.cache", "etc/fstab", "etc/mtab", "etc/passwd", "etc/group", "etc/shadow", "etc/machine-id", "etc/initrd-release",
	"etc/vconsole.conf", "etc/locale.conf", "etc/cmdline.d/*", "etc/conf.d/*",
	"lib/modules/*/modules.*", "usr/lib/modules/*/modules.*",
}

// rootCopy says where on the root an archive member is a copy of, if the
// server compares it ("" if not).
func rootCopy(name string, manifestCopies map[string]string) string {
	if manifestCopies != nil {
		return manifestCopies[name]
	}
	for _, g := range generated {
		if ok, _ := path.Match(g, name); ok {
			return ""
		}
	}
	for _, c := range copied {
		if strings.HasPrefix(name, c) {
			return name
		}
	}
	return ""
}

// MaxDriftNames is how many differing files a stale-archive event names.
const MaxDriftNames = 20

// manifestMember is where nbh's archives carry their manifest.
const manifestMember = "etc/nbh/manifest.json"

// scanArchive reads an archive once for what the comparison needs first:
// the manifest of an archive of nbh's (archive path -> root path of each
// copy of the root; nil for another archive), and how often each name
// occurs (the kernel keeps the last of a name).
func scanArchive(ctx context.Context, file string) (copies map[string]string, count map[string]int, err error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	count = map[string]int{}
	err = archive.Read(ctx, f, func(m archive.Member, data io.Reader) error {
		count[m.Name]++
		if m.Name != manifestMember || !m.Regular() || m.Size > 16<<20 {
			return nil
		}
		b, err := io.ReadAll(data)
		if err != nil {
			return err
		}
		mf, err := manifest.Parse(b)
		if err != nil {
			return nil // not nbh's manifest after all
		}
		copies = map[string]string{}
		for _, e := range mf.Tracked() {
			copies[strings.TrimPrefix(e.Path, "/")] = strings.TrimPrefix(e.RootPath(), "/")
		}
		return nil
	})
	return copies, count, err
}

// hashRootFile hashes the root's regular file at name, at most want+1
// bytes: opened without blocking (a FIFO), its type checked on the handle
// (a link swapped in after a lookup names no FIFO or device that is read).
func hashRootFile(root *os.Root, name string, want int64) ([]byte, bool) {
	f, err := root.OpenFile(name, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, false
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return nil, false
	}
	h := sha256.New()
	if _, err := io.CopyN(h, f, want+1); err != nil && err != io.EOF {
		return nil, false
	}
	return h.Sum(nil), true
}

// archiveDrift compares the archive at file with the root tree: it returns
// the members that are copies of the root's files (rootCopy) and differ
// from them now, and how many were compared. Of a name the archive holds
// twice, the last is what the kernel unpacks, and what is compared.
func archiveDrift(ctx context.Context, file string, root *os.Root) (differ []string, compared int, err error) {
	copies, count, err := scanArchive(ctx, file)
	if err != nil {
		return nil, 0, err
	}
	f, err := os.Open(file)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	seen := map[string]int{}
	err = archive.Read(ctx, f, func(m archive.Member, data io.Reader) error {
		if seen[m.Name]++; seen[m.Name] < count[m.Name] {
			return nil // a later member of the name replaces it
		}
		if !m.Regular() || (m.Nlink > 1 && m.Size == 0) {
			return nil
		}
		onRoot := rootCopy(m.Name, copies)
		if onRoot == "" {
			return nil
		}
		fi, err := root.Lstat(onRoot)
		if err != nil || !fi.Mode().IsRegular() {
			return nil // not a file on the root (any more)
		}
		compared++
		if fi.Size() != m.Size {
			differ = append(differ, m.Name)
			return nil
		}
		a := sha256.New()
		if _, err := io.Copy(a, data); err != nil {
			return err
		}
		b, ok := hashRootFile(root, onRoot, m.Size)
		if !ok || string(a.Sum(nil)) != string(b) {
			differ = append(differ, m.Name)
		}
		return nil
	})
	return differ, compared, err
}

// servedArchive is the archive the guest was served: the keeper's current
// build of the reference archive, or the user's.
func (g *Guest) servedArchive() string {
	if g.keeper != nil {
		return g.keeper.path()
	}
	return g.initrd
}

// checkDrift runs the comparison once for boot b, when the guest's NFS
// root is mounted (started by observe), until the boot or the guest ends
// (the boot's ctx).
func (g *Guest) checkDrift(b *boot) {
	b.driftOnce.Do(func() {
		defer close(b.driftDone)
		file := g.servedArchive()
		if file == "" || g.rootFS == nil {
			return
		}
		tl := g.lab.tl
		start := time.Now()
		differ, compared, err := archiveDrift(b.ctx, file, g.rootFS)
		detail := map[string]any{"compared": compared, "seconds": time.Since(start).Seconds()}
		if err != nil {
			// Not read through (a compression it does not read, a cut
			// archive, the guest closed): no verdict on freshness.
			detail["error"] = err.Error()
			msg := fmt.Sprintf("the server could not compare the archive with the root: %v", err)
			if b.ctx.Err() == nil {
				g.mu.Lock()
				b.driftWarn = msg
				g.mu.Unlock()
			}
			tl.Emit(timeline.Event{Source: "archive", Kind: "archive-unchecked", Guest: g.Name, Boot: b.id, Msg: msg, Detail: detail})
			return
		}
		if len(differ) == 0 {
			tl.Emit(timeline.Event{Source: "archive", Kind: "archive-fresh", Guest: g.Name, Boot: b.id,
				Msg: fmt.Sprintf("the archive's %d files on the root are the root's", compared), Detail: detail})
			return
		}
		names := differ
		if len(names) > MaxDriftNames {
			names = names[:MaxDriftNames]
		}
		detail["files"] = differ
		msg := fmt.Sprintf("%d of the archive's %d files on the root differ from the root's: %s", len(differ), compared, strings.Join(names, ", "))
		if len(names) < len(differ) {
			msg += ", …"
		}
		g.mu.Lock()
		b.drift = msg
		g.mu.Unlock()
		tl.Emit(timeline.Event{Source: "archive", Kind: "stale-archive", Guest: g.Name, Boot: b.id, Msg: msg, Detail: detail})
	})
}

// driftFound waits (briefly) for boot b's comparison under way and returns
// what it found: a stale archive's files, or why it could not tell ("" for
// neither, or nothing yet).
func (b *boot) driftFound(g *Guest, wait bool) (stale, unchecked string) {
	g.mu.Lock()
	started := b.driftStarted
	g.mu.Unlock()
	if started && wait {
		select {
		case <-b.driftDone:
		case <-time.After(5 * time.Second):
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return b.drift, b.driftWarn
}
