// Package nfs is the lab's NFSv3 server (github.com/willscott/go-nfs, MOUNT
// and NFS on one TCP port) on the fabric host stack. One export path serves
// every guest of a lab, each from its own writable copy of the root, chosen
// by the client's address: one test never changes another's root, or the
// fixtures. Files are reached through go-billy's bound OS filesystem, so
// symlinks are resolved inside the export and never lead out of it; file
// handles are opaque and a forged one is answered as stale.
package nfs

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	billy "github.com/go-git/go-billy/v5"
	"github.com/go-git/go-billy/v5/osfs"
	gonfs "github.com/willscott/go-nfs"
	"github.com/willscott/go-nfs/helpers"
	"github.com/willscott/go-nfs/helpers/memfs"

	"nbh.dev/nbh/harness/timeline"
)

// Port is where MOUNT and NFS listen (both, on TCP).
const Port = 2049

// Server is a running NFS server.
type Server struct {
	tl      *timeline.Timeline
	ln      *gateListener
	done    chan struct{}
	handles *forgetting

	mu      sync.Mutex
	exports map[string]map[string]billy.Filesystem // export path -> client IP -> root
}

var quietOnce sync.Once

// Serve serves NFS and MOUNT on ln (the lab uses the fabric host's port
// 2049 on both of its addresses; unit tests use loopback).
func Serve(ln net.Listener, tl *timeline.Timeline) *Server {
	// go-nfs logs to stderr through a process-wide logger; the Linux client
	// probing for NFS_ACL (program 100227), which is not served, is routine,
	// not an error worth a line in every test. $LOG_LEVEL still applies.
	quietOnce.Do(func() {
		if os.Getenv("LOG_LEVEL") == "" {
			gonfs.Log.SetLevel(gonfs.FatalLevel)
		}
	})
	s := &Server{tl: tl, done: make(chan struct{}), exports: map[string]map[string]billy.Filesystem{}}
	s.ln = &gateListener{Listener: ln, emit: s.emit}
	h := &forgetting{CachingHandler: helpers.NewCachingHandler(&handler{s: s}, 4096).(*helpers.CachingHandler), issued: map[billy.Filesystem]map[string]bool{}}
	s.handles = h
	srv := &gonfs.Server{Handler: h, Context: context.Background()}
	go func() {
		defer close(s.done)
		srv.Serve(s.ln)
	}()
	return s
}

// Close stops the server and cuts the connections still open.
func (s *Server) Close() error {
	err := s.ln.closeAll()
	<-s.done
	s.mu.Lock()
	for _, byIP := range s.exports {
		for _, fs := range byIP {
			if c, ok := fs.(*changeFS); ok {
				c.root.Close()
			}
		}
	}
	s.mu.Unlock()
	return err
}

// Disconnect cuts the connections of the client at ip: a guest that is
// gone never closes them, and go-nfs would serve each (a goroutine, its
// buffers) for ever.
func (s *Server) Disconnect(ip string) int { return s.ln.closeFrom(ip) }

// Unexport withdraws path from the client at ip.
func (s *Server) Unexport(path, ip string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c, ok := s.exports[path][ip].(*changeFS); ok {
		c.root.Close()
		delete(s.exports[path], ip)
		s.handles.forget(c)
	}
}

// forgetting is go-nfs's handle cache, recording the handles it gives out
// per exported file system, so that a withdrawn export's go with it: a
// long-lived lab's closed guests would otherwise hold up to the cache's
// 4,096 entries, each keeping a dead export alive.
type forgetting struct {
	*helpers.CachingHandler

	mu     sync.Mutex
	issued map[billy.Filesystem]map[string]bool
}

func (h *forgetting) ToHandle(f billy.Filesystem, path []string) []byte {
	b := h.CachingHandler.ToHandle(f, path)
	h.mu.Lock()
	if h.issued[f] == nil {
		h.issued[f] = map[string]bool{}
	}
	h.issued[f][string(b)] = true
	h.mu.Unlock()
	return b
}

// forget invalidates every handle given out for f.
func (h *forgetting) forget(f billy.Filesystem) {
	h.mu.Lock()
	issued := h.issued[f]
	delete(h.issued, f)
	h.mu.Unlock()
	for b := range issued {
		h.CachingHandler.InvalidateHandle(f, []byte(b))
	}
}

// Export serves dir as path to the client at ip.
func (s *Server) Export(path, ip, dir string) error {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return fmt.Errorf("nfs: export %s: %w", path, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.exports[path] == nil {
		s.exports[path] = map[string]billy.Filesystem{}
	}
	if old, ok := s.exports[path][ip].(*changeFS); ok {
		old.root.Close()
		s.handles.forget(old)
	}
	s.exports[path][ip] = &changeFS{Filesystem: osfs.New(dir, osfs.WithBoundOS()), root: root}
	return nil
}

// Exported reports whether path is exported to the client at ip.
func (s *Server) Exported(path, ip string) bool {
	_, ok := s.lookup(path, ip)
	return ok
}

func (s *Server) lookup(path, ip string) (billy.Filesystem, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	byIP, ok := s.exports[path]
	if !ok {
		return nil, false
	}
	fs, ok := byIP[ip]
	return fs, ok
}

func (s *Server) emit(e timeline.Event) {
	e.Source = "nfs"
	s.tl.Emit(e)
}

// refused is the empty file system behind a refused mount.
var refused = memfs.New()

// handler answers MOUNT by export path and client address.
type handler struct{ s *Server }

func (h *handler) Mount(ctx context.Context, conn net.Conn, req gonfs.MountRequest) (gonfs.MountStatus, billy.Filesystem, []gonfs.AuthFlavor) {
	ip := addrOf(conn.RemoteAddr())
	path := "/" + strings.Trim(filepath.Clean("/"+string(req.Dirpath)), "/")
	fs, ok := h.s.lookup(path, ip)
	if !ok {
		h.s.emit(timeline.Event{Kind: "mount-refused", Addr: ip, Msg: path, Detail: map[string]any{"asked": string(req.Dirpath), "error": "no such export for this client"}})
		// go-nfs v0.0.4 asks for a handle of the returned file system even
		// when refusing, and a nil one panics the server: hand it an
		// empty one (the handle is not sent).
		return gonfs.MountStatusErrNoEnt, refused, nil
	}
	h.s.emit(timeline.Event{Kind: "mount", Addr: ip, Msg: path})
	return gonfs.MountStatusOk, fs, []gonfs.AuthFlavor{gonfs.AuthFlavorNull}
}

func (h *handler) Change(fs billy.Filesystem) billy.Change {
	c, _ := fs.(billy.Change)
	return c
}

func (h *handler) FSStat(ctx context.Context, fs billy.Filesystem, st *gonfs.FSStat) error {
	st.TotalSize, st.FreeSize, st.AvailableSize = 1<<34, 1<<33, 1<<33
	st.TotalFiles, st.FreeFiles, st.AvailableFiles = 1<<20, 1<<19, 1<<19
	return nil
}

// The caching handler wrapped around this one supplies file handles.
func (h *handler) ToHandle(billy.Filesystem, []string) []byte { return nil }
func (h *handler) FromHandle([]byte) (billy.Filesystem, []string, error) {
	return nil, nil, os.ErrNotExist
}
func (h *handler) InvalidateHandle(billy.Filesystem, []byte) error { return nil }
func (h *handler) HandleLimit() int                                { return 4096 }

// changeFS adds attribute changes (chmod, chown, utimes) to the bound OS
// filesystem through an os.Root: each change resolves its path and acts on
// it in one step inside the export, so a guest that swaps a component for
// a symlink between a lookup and the change cannot reach outside (a
// resolve-then-os.Chmod would follow the new link, as root in CI).
type changeFS struct {
	billy.Filesystem
	root *os.Root
}

// inRoot is a client path as a name relative to the export's root.
func inRoot(name string) string {
	rel := strings.TrimLeft(filepath.Clean("/"+name), "/")
	if rel == "" {
		return "."
	}
	return rel
}

// Remove and Rename act on a symlink itself, as POSIX says, through the
// os.Root: billy's bound file system resolves the link first, so "rm link"
// removed the file it names and renaming a link renamed its target (or,
// for a link out of the export, failed).
func (c *changeFS) Remove(name string) error { return c.root.Remove(inRoot(name)) }

func (c *changeFS) Rename(from, to string) error {
	return c.root.Rename(inRoot(from), inRoot(to))
}

func (c *changeFS) Chmod(name string, mode os.FileMode) error {
	return c.root.Chmod(inRoot(name), mode)
}

func (c *changeFS) Lchown(name string, uid, gid int) error {
	return c.root.Lchown(inRoot(name), uid, gid)
}

func (c *changeFS) Chown(name string, uid, gid int) error {
	return c.root.Chown(inRoot(name), uid, gid)
}

func (c *changeFS) Chtimes(name string, atime, mtime time.Time) error {
	return c.root.Chtimes(inRoot(name), atime, mtime)
}

// Stat, Lstat and ReadDir report the setuid, setgid and sticky bits as the
// Unix mode bits the client reads: go-nfs sends a file's os.FileMode as its
// NFS mode, where Go keeps those bits far above the permissions, so
// /usr/bin/su and /tmp arrived as plain 0755 and 0777.
func (c *changeFS) Stat(name string) (os.FileInfo, error) {
	fi, err := c.Filesystem.Stat(name)
	return unixModes(fi), err
}

func (c *changeFS) Lstat(name string) (os.FileInfo, error) {
	fi, err := c.Filesystem.Lstat(name)
	return unixModes(fi), err
}

func (c *changeFS) ReadDir(name string) ([]os.FileInfo, error) {
	fis, err := c.Filesystem.ReadDir(name)
	for i, fi := range fis {
		fis[i] = unixModes(fi)
	}
	return fis, err
}

// unixMode is a FileInfo whose mode carries the special bits at their Unix
// places (04000, 02000, 01000).
type unixMode struct{ os.FileInfo }

const goSpecial = os.ModeSetuid | os.ModeSetgid | os.ModeSticky

func (u unixMode) Mode() os.FileMode {
	m := u.FileInfo.Mode()
	out := m &^ goSpecial
	if m&os.ModeSetuid != 0 {
		out |= 0o4000
	}
	if m&os.ModeSetgid != 0 {
		out |= 0o2000
	}
	if m&os.ModeSticky != 0 {
		out |= 0o1000
	}
	return out
}

func unixModes(fi os.FileInfo) os.FileInfo {
	if fi == nil || fi.Mode()&goSpecial == 0 {
		return fi
	}
	return unixMode{fi}
}
