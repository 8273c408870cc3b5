package nfs

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	billy "github.com/go-git/go-billy/v5"

	"nbh.dev/nbh/internal/rules"
)

// export is one client's root as go-nfs sees it: a billy file system whose
// every operation resolves its path and acts on it in one step inside an
// os.Root, so a guest that swaps a directory for a symlink between two
// operations (or within one) cannot reach outside its export; absolute
// symlinks are not followed at all (an NFS client resolves links itself).
// It also keeps the export's file handles (handles.go) and counts what the
// guest adds to it against its quota.
type export struct {
	root    *os.Root
	dir     string
	handles *handles
	quota   Quota
	*tree   // shared by the exports of one folder (a guest's IPv4 and IPv6 mounts)
}

// tree is what the exports of one folder share: what the guest added to
// it, against one quota, and the listings kept of it.
type tree struct {
	bytes atomic.Int64 // bytes of disk the guest added since the export (less what it freed)
	files atomic.Int64 // files, folders and links it added (less those it removed)

	listMu   sync.Mutex
	listings map[string]listing // recent folder listings (ReadDir)
	listGen  uint64             // changes so far: a listing read across one is not kept
}

// Quota bounds what one guest may add to its NFS root: bytes of disk
// (blocks, so a sparse file costs what it uses) and names. Past them, a
// write fails with NFS3ERR_DQUOT and a create with an error (go-nfs answers
// every failed create as NFS3ERR_ACCES).
type Quota struct {
	Bytes int64
	Files int64
}

var defaultQuota = Quota{Bytes: 2 << 30, Files: 100_000}

// DefaultQuota is what one guest may add to its NFS root by default.
func DefaultQuota() Quota { return defaultQuota }

// errQuota is a guest past its quota.
var errQuota = fmt.Errorf("nfs: quota: %w", syscall.EDQUOT)

// newExport exports dir, sharing t with the folder's other exports (nil:
// it has none).
func newExport(dir string, q Quota, t *tree) (*export, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, err
	}
	if q == (Quota{}) {
		q = defaultQuota
	}
	if t == nil {
		t = &tree{listings: map[string]listing{}}
	}
	e := &export{root: root, dir: dir, quota: q, tree: t}
	e.handles = newHandles(e)
	return e, nil
}

// inRoot is a client path as a name relative to the export's root.
func inRoot(name string) string {
	rel := strings.TrimLeft(filepath.Clean("/"+name), "/")
	if rel == "" {
		return "."
	}
	return rel
}

// usage is a file's disk use in bytes, 0 if unknown.
func usage(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return 0
}

// addFile counts one more name against the quota, or refuses it.
func (e *export) addFile() error {
	if e.files.Add(1) > e.quota.Files && rules.On(rules.NFSQuota) {
		e.files.Add(-1)
		return errQuota
	}
	return nil
}

func (e *export) Create(name string) (billy.File, error) {
	return e.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o666)
}

func (e *export) Open(name string) (billy.File, error) { return e.OpenFile(name, os.O_RDONLY, 0) }

func (e *export) OpenFile(name string, flag int, perm os.FileMode) (billy.File, error) {
	rel := inRoot(name)
	if flag&(os.O_WRONLY|os.O_RDWR|os.O_CREATE|os.O_TRUNC) != 0 {
		defer e.changed()
	}
	created := false
	if flag&os.O_CREATE != 0 {
		fi, err := e.root.Lstat(rel)
		if err == nil && fi.Mode()&os.ModeSymlink != 0 {
			// Creating through a link would make a file the quota
			// never saw by its name: an NFS client creates names, and
			// resolves links itself.
			return nil, &fs.PathError{Op: "create", Path: name, Err: syscall.ELOOP}
		}
		if errors.Is(err, fs.ErrNotExist) {
			if err := e.addFile(); err != nil {
				return nil, err
			}
			created = true
		}
	}
	// Non-blocking: a FIFO on a user's root would block the open (and a
	// server goroutine) for ever; a regular file ignores the flag.
	var f *os.File
	var err error
	if rules.On(rules.NFSExport) {
		f, err = e.root.OpenFile(rel, flag|syscall.O_NONBLOCK, perm)
	} else {
		f, err = os.OpenFile(filepath.Join(e.dir, rel), flag|syscall.O_NONBLOCK, perm) // resolve, then open: the race
	}
	if err != nil {
		if created {
			e.files.Add(-1)
		}
		return nil, err
	}
	return &file{File: f, name: name, e: e}, nil
}

func (e *export) Stat(name string) (os.FileInfo, error) {
	fi, err := e.root.Stat(inRoot(name))
	return unixModes(fi), err
}

func (e *export) Lstat(name string) (os.FileInfo, error) {
	fi, err := e.root.Lstat(inRoot(name))
	return unixModes(fi), err
}

// Remove and Rename act on a symlink itself, as POSIX says.
func (e *export) Remove(name string) error {
	defer e.changed()
	rel := inRoot(name)
	fi, statErr := e.root.Lstat(rel)
	if err := e.root.Remove(rel); err != nil {
		return err
	}
	if statErr == nil {
		e.files.Add(-1)
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && (st.Nlink <= 1 || fi.IsDir()) {
			e.bytes.Add(-usage(fi))
		}
	}
	return nil
}

func (e *export) Rename(from, to string) error {
	defer e.changed()
	rel := inRoot(to)
	old, statErr := e.root.Lstat(rel)
	src, srcErr := e.root.Lstat(inRoot(from))
	if err := e.root.Rename(inRoot(from), rel); err != nil {
		return err
	}
	// A name renamed over another name of the same file (or itself)
	// changes nothing, POSIX says: nothing was replaced.
	if statErr == nil && (srcErr != nil || !os.SameFile(src, old)) { // replaced
		e.files.Add(-1)
		if st, ok := old.Sys().(*syscall.Stat_t); ok && st.Nlink <= 1 {
			e.bytes.Add(-usage(old))
		}
	}
	return nil
}

func (e *export) Join(elem ...string) string { return filepath.Join(elem...) }

func (e *export) TempFile(dir, prefix string) (billy.File, error) {
	return nil, billy.ErrNotSupported
}

// ReadDir lists a folder: each entry's attributes are read through the
// os.Root too (File.Readdir would stat each by a path again). go-nfs asks
// for the whole listing for every page of a READDIR, so a listing is kept
// for a moment: paging through a folder of N names costs one listing, not
// one per page.
func (e *export) ReadDir(name string) ([]os.FileInfo, error) {
	rel := inRoot(name)
	e.listMu.Lock()
	if l, ok := e.listings[rel]; ok && time.Since(l.at) < listingTTL {
		e.listMu.Unlock()
		return append([]os.FileInfo(nil), l.infos...), nil // go-nfs sorts its copy
	}
	gen := e.listGen
	e.listMu.Unlock()
	out, err := e.readDir(rel)
	if err != nil {
		return nil, err
	}
	e.listMu.Lock()
	if len(e.listings) >= maxListings {
		clear(e.listings)
	}
	if e.listGen == gen { // nothing changed while it was read
		e.listings[rel] = listing{at: time.Now(), infos: out}
	}
	e.listMu.Unlock()
	return append([]os.FileInfo(nil), out...), nil
}

// changed forgets the kept listings: whatever the guest changes (a name,
// a file's size, mode or times) is in the next listing, as if none was kept.
func (e *export) changed() {
	e.listMu.Lock()
	clear(e.listings)
	e.listGen++
	e.listMu.Unlock()
}

// A listing is kept for listingTTL, at most maxListings of them.
const (
	listingTTL  = 2 * time.Second
	maxListings = 16
)

type listing struct {
	at    time.Time
	infos []os.FileInfo
}

func (e *export) readDir(rel string) ([]os.FileInfo, error) {
	d, err := e.root.Open(rel)
	if err != nil {
		return nil, err
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return nil, err
	}
	out := make([]os.FileInfo, 0, len(names))
	for _, n := range names {
		fi, err := e.root.Lstat(filepath.Join(rel, n))
		if err != nil {
			continue // gone since the listing
		}
		out = append(out, unixModes(fi))
	}
	return out, nil
}

// MkdirAll makes one folder: go-nfs asks for a new name in a folder that
// exists (a name with slashes in it finds no parent and fails), and the
// quota counts the one name and the folder's blocks.
func (e *export) MkdirAll(name string, perm os.FileMode) error {
	defer e.changed()
	rel := inRoot(name)
	if fi, err := e.root.Lstat(rel); err == nil && fi.IsDir() {
		return nil // there already, as MkdirAll says
	}
	if err := e.addFile(); err != nil {
		return err
	}
	if err := e.root.Mkdir(rel, perm); err != nil {
		e.files.Add(-1)
		return err
	}
	if fi, err := e.root.Lstat(rel); err == nil {
		e.bytes.Add(usage(fi))
	}
	return nil
}

func (e *export) Symlink(target, link string) error {
	defer e.changed()
	if err := e.addFile(); err != nil {
		return err
	}
	if err := e.root.Symlink(target, inRoot(link)); err != nil {
		e.files.Add(-1)
		return err
	}
	return nil
}

func (e *export) Readlink(name string) (string, error) { return e.root.Readlink(inRoot(name)) }

func (e *export) Chroot(string) (billy.Filesystem, error) { return nil, billy.ErrNotSupported }

func (e *export) Root() string { return e.dir }

// Attribute changes, through the os.Root as well (billy.Change).

func (e *export) Chmod(name string, mode os.FileMode) error {
	defer e.changed()
	return e.root.Chmod(inRoot(name), mode)
}

func (e *export) Lchown(name string, uid, gid int) error {
	defer e.changed()
	return e.root.Lchown(inRoot(name), uid, gid)
}

func (e *export) Chown(name string, uid, gid int) error {
	defer e.changed()
	return e.root.Chown(inRoot(name), uid, gid)
}

func (e *export) Chtimes(name string, atime, mtime time.Time) error {
	defer e.changed()
	return e.root.Chtimes(inRoot(name), atime, mtime)
}

// file is an open file of an export: its writes and truncations count
// against the export's quota by the blocks they add.
type file struct {
	*os.File
	name string
	e    *export
}

func (f *file) Name() string { return f.name }
func (f *file) Lock() error  { return nil }
func (f *file) Unlock() error {
	return nil
}

// grow runs op (a write or truncation that may add up to most bytes) if
// the quota has room for it, and counts the blocks it added.
func (f *file) grow(most int64, op func() error) error {
	defer f.e.changed()
	before, err := f.Stat()
	if err != nil {
		return err
	}
	// Room for the worst case: every byte new, plus a block for the
	// file system's own bookkeeping.
	if most > 0 && f.e.bytes.Load()+most+4096 > f.e.quota.Bytes && rules.On(rules.NFSQuota) {
		return errQuota
	}
	err = op()
	if after, serr := f.Stat(); serr == nil {
		f.e.bytes.Add(usage(after) - usage(before))
	}
	return err
}

func (f *file) Write(p []byte) (int, error) {
	var n int
	err := f.grow(int64(len(p)), func() (err error) { n, err = f.File.Write(p); return err })
	return n, err
}

func (f *file) WriteAt(p []byte, off int64) (int, error) {
	var n int
	err := f.grow(int64(len(p)), func() (err error) { n, err = f.File.WriteAt(p, off); return err })
	return n, err
}

// Truncate to a larger size makes a hole (no blocks); to a smaller one it
// frees blocks. Either way it is counted by what it did.
func (f *file) Truncate(size int64) error {
	return f.grow(0, func() error { return f.File.Truncate(size) })
}
