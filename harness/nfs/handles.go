package nfs

import (
	"crypto/rand"
	"path/filepath"
	"sync"
	"syscall"

	lru "github.com/hashicorp/golang-lru/v2"
	gonfs "github.com/willscott/go-nfs"

	"nbh.dev/nbh/internal/rules"
)

// handleLimit is how many file handles one export keeps (its root's
// besides): the most recently used; a client asks again for one it lost.
const handleLimit = 8192

// handleSize is a handle's length: the export's ID, then the file's.
const handleSize = 8 + 16

// handles are one export's NFS file handles. Each is random (a client
// cannot make one up) and names a path in the export, bound to the
// identity (device and inode) of the file it named when given out: a
// handle whose path now names another file — replaced, or swapped for a
// link — is stale, as a real server's is for a file that is gone. Each
// export has its own table, so one guest's files never push another's
// handles out, and a withdrawn export's handles go with it.
type handles struct {
	e  *export
	id [8]byte

	mu     sync.Mutex
	lru    *lru.Cache[[16]byte, handleEntry]
	byPath map[string][16]byte
	root   [16]byte // the root's handle, never dropped
}

type handleEntry struct {
	path  []string
	ident ident
}

// ident is a file's identity on the host.
type ident struct{ dev, ino uint64 }

func newHandles(e *export) *handles {
	h := &handles{e: e, byPath: map[string][16]byte{}}
	rand.Read(h.id[:])
	rand.Read(h.root[:])
	h.lru, _ = lru.NewWithEvict(handleLimit, func(id [16]byte, v handleEntry) {
		if h.byPath[filepath.Join(v.path...)] == id {
			delete(h.byPath, filepath.Join(v.path...))
		}
	})
	return h
}

// identOf is the identity of the file at path in the export, without
// following a link at its end; ok is false when there is none.
func (h *handles) identOf(path []string) (ident, bool) {
	fi, err := h.e.root.Lstat(inRoot(filepath.Join(path...)))
	if err != nil {
		return ident{}, false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return ident{}, false
	}
	return ident{uint64(st.Dev), st.Ino}, true
}

// toHandle is the handle of path: the one given out for it before if it
// still names the same file, else a new one.
func (h *handles) toHandle(path []string) []byte {
	out := append([]byte(nil), h.id[:]...)
	if len(path) == 0 {
		return append(out, h.root[:]...)
	}
	id, _ := h.identOf(path)
	key := filepath.Join(path...)
	h.mu.Lock()
	defer h.mu.Unlock()
	if old, ok := h.byPath[key]; ok {
		if e, ok := h.lru.Get(old); ok && e.ident == id {
			return append(out, old[:]...)
		}
	}
	var n [16]byte
	rand.Read(n[:])
	h.lru.Add(n, handleEntry{path: append([]string(nil), path...), ident: id})
	h.byPath[key] = n
	return append(out, n[:]...)
}

// fromHandle is the path a handle of this export names, or a stale error
// when the table no longer holds it or its path names another file now.
func (h *handles) fromHandle(b []byte) ([]string, error) {
	var n [16]byte
	copy(n[:], b)
	if n == h.root {
		return []string{}, nil
	}
	h.mu.Lock()
	e, ok := h.lru.Get(n)
	if ok {
		// The folders above it stay too: a client walks down again
		// from them.
		for i := 1; i < len(e.path); i++ {
			if up, ok := h.byPath[filepath.Join(e.path[:i]...)]; ok {
				h.lru.Get(up)
			}
		}
	}
	h.mu.Unlock()
	if !ok {
		return nil, errStale
	}
	if now, ok := h.identOf(e.path); (!ok || now != e.ident) && rules.On(rules.NFSHandles) {
		h.mu.Lock()
		h.lru.Remove(n)
		h.mu.Unlock()
		return nil, errStale
	}
	return append([]string(nil), e.path...), nil
}

var errStale = &gonfs.NFSStatusError{NFSStatus: gonfs.NFSStatusStale}
