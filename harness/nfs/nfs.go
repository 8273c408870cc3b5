// Package nfs is the lab's NFSv3 server (github.com/willscott/go-nfs, MOUNT
// and NFS on one TCP port) on the fabric host stack. One export path serves
// every guest of a lab, each from its own writable copy of the root, chosen
// by the client's address: one test never changes another's root, or the
// fixtures. Every operation resolves its path and acts on it in one step
// inside an os.Root (export.go), so a symlink, even one swapped in
// mid-operation, never leads out of the export; file handles are random,
// per export and bound to the file's identity (handles.go), and a forged,
// forgotten or reused one is answered as stale. What a guest adds to its
// root is bounded by a quota.
package nfs

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"

	billy "github.com/go-git/go-billy/v5"
	gonfs "github.com/willscott/go-nfs"
	"github.com/willscott/go-nfs/helpers/memfs"

	"nbh.dev/nbh/harness/timeline"
)

// Port is where MOUNT and NFS listen (both, on TCP).
const Port = 2049

// Server is a running NFS server.
type Server struct {
	tl    *timeline.Timeline
	ln    *gateListener
	done  chan struct{}
	quota Quota

	mu      sync.Mutex
	exports map[string]map[string]*export // export path -> client IP -> root
	byID    map[[8]byte]*export           // each export by its handles' ID
}

var quietOnce sync.Once

// Serve serves NFS and MOUNT on ln (the lab uses the fabric host's port
// 2049 on both of its addresses; unit tests use loopback). Each guest may
// add up to quota to its root (zero: DefaultQuota).
func Serve(ln net.Listener, tl *timeline.Timeline, quota Quota) *Server {
	// go-nfs logs to stderr through a process-wide logger; the Linux client
	// probing for NFS_ACL (program 100227), which is not served, is routine,
	// not an error worth a line in every test. $LOG_LEVEL still applies.
	quietOnce.Do(func() {
		if os.Getenv("LOG_LEVEL") == "" {
			gonfs.Log.SetLevel(gonfs.FatalLevel)
		}
	})
	s := &Server{tl: tl, done: make(chan struct{}), quota: quota,
		exports: map[string]map[string]*export{}, byID: map[[8]byte]*export{}}
	s.ln = &gateListener{Listener: ln, emit: s.emit}
	// The handler is not go-nfs's caching one: handles are the exports'
	// own, and directory listings are not cached across exports (its
	// cache is keyed by path and names alone, whoever asks).
	srv := &gonfs.Server{Handler: &handler{s: s}, Context: context.Background()}
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
		for _, e := range byIP {
			e.root.Close()
		}
	}
	s.mu.Unlock()
	return err
}

// Disconnect cuts the connections of the client at ip: a guest that is
// gone never closes them, and go-nfs would serve each (a goroutine, its
// buffers) for ever.
func (s *Server) Disconnect(ip string) int { return s.ln.closeFrom(ip) }

// Unexport withdraws path from the client at ip, and its handles with it.
func (s *Server) Unexport(path, ip string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dropLocked(path, ip)
}

func (s *Server) dropLocked(path, ip string) {
	if e, ok := s.exports[path][ip]; ok {
		e.root.Close()
		delete(s.exports[path], ip)
		delete(s.byID, e.handles.id)
	}
}

// Export serves dir as path to the client at ip.
func (s *Server) Export(path, ip, dir string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	// The same folder to another address of the guest's: one quota, one
	// set of listings.
	var shared *tree
	for other, o := range s.exports[path] {
		if o.dir == dir && other != ip {
			shared = o.tree
		}
	}
	e, err := newExport(dir, s.quota, shared)
	if err != nil {
		return fmt.Errorf("nfs: export %s: %w", path, err)
	}
	if s.exports[path] == nil {
		s.exports[path] = map[string]*export{}
	}
	s.dropLocked(path, ip)
	s.exports[path][ip] = e
	s.byID[e.handles.id] = e
	return nil
}

// Usage is what the client at ip added to export path so far (bytes of
// disk, names), against its quota.
func (s *Server) Usage(path, ip string) (Quota, bool) {
	e, ok := s.lookup(path, ip)
	if !ok {
		return Quota{}, false
	}
	return Quota{Bytes: e.bytes.Load(), Files: e.files.Load()}, true
}

// Exported reports whether path is exported to the client at ip.
func (s *Server) Exported(path, ip string) bool {
	_, ok := s.lookup(path, ip)
	return ok
}

func (s *Server) lookup(path, ip string) (*export, bool) {
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
	e, ok := h.s.lookup(path, ip)
	if !ok {
		h.s.emit(timeline.Event{Kind: "mount-refused", Addr: ip, Msg: path, Detail: map[string]any{"asked": string(req.Dirpath), "error": "no such export for this client"}})
		// go-nfs v0.0.4 asks for a handle of the returned file system even
		// when refusing, and a nil one panics the server: hand it an
		// empty one (the handle is not sent).
		return gonfs.MountStatusErrNoEnt, refused, nil
	}
	h.s.emit(timeline.Event{Kind: "mount", Addr: ip, Msg: path})
	return gonfs.MountStatusOk, e, []gonfs.AuthFlavor{gonfs.AuthFlavorNull}
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

// ToHandle is the export's handle for path (handles.go).
func (h *handler) ToHandle(fs billy.Filesystem, path []string) []byte {
	e, ok := fs.(*export)
	if !ok {
		return make([]byte, handleSize) // the refused mount's: never sent
	}
	return e.handles.toHandle(path)
}

// FromHandle finds a handle's export by its first bytes, then its path.
func (h *handler) FromHandle(fh []byte) (billy.Filesystem, []string, error) {
	if len(fh) != handleSize {
		return nil, nil, errStale
	}
	h.s.mu.Lock()
	e := h.s.byID[[8]byte(fh[:8])]
	h.s.mu.Unlock()
	if e == nil {
		return nil, nil, errStale
	}
	p, err := e.handles.fromHandle(fh[8:])
	if err != nil {
		return nil, nil, err
	}
	return e, p, nil
}

func (h *handler) InvalidateHandle(fs billy.Filesystem, fh []byte) error {
	if e, ok := fs.(*export); ok && len(fh) == handleSize {
		e.handles.mu.Lock()
		e.handles.lru.Remove([16]byte(fh[8:]))
		e.handles.mu.Unlock()
	}
	return nil
}

func (h *handler) HandleLimit() int { return handleLimit }

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
