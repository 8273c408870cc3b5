// Package httpboot is the lab's HTTP boot-file server: net/http with Range
// requests over the fabric's TCP listener, serving one root folder through an
// os.Root, so "..", absolute paths and symlinks leaving the root are refused.
// Each request is an event with its status, bytes and duration.
package httpboot

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"path"
	"strings"
	"sync/atomic"
	"time"

	"nbh.dev/nbh/harness/bootfile"
	"nbh.dev/nbh/harness/timeline"
)

// Server is a running HTTP server.
type Server struct {
	srv  *http.Server
	ln   net.Listener
	tl   *timeline.Timeline
	done chan struct{}
}

// Network is where a server listens: the lab's fabric host
// (*netfab.Fabric).
type Network interface {
	ListenTCPAt(addr netip.AddrPort) (net.Listener, error)
}

// Start serves what open opens on addr of n.
func Start(n Network, addr netip.AddrPort, open bootfile.Opener, tl *timeline.Timeline) (*Server, error) {
	ln, err := n.ListenTCPAt(addr)
	if err != nil {
		return nil, fmt.Errorf("http: %w", err)
	}
	s := &Server{ln: ln, tl: tl, done: make(chan struct{})}
	s.srv = &http.Server{
		Handler:           Handler(open, tl),
		ReadHeaderTimeout: 30 * time.Second,
	}
	go func() {
		defer close(s.done)
		s.srv.Serve(ln)
	}()
	return s, nil
}

// Close stops the server at once; transfers in flight are cut.
func (s *Server) Close() error {
	err := s.srv.Close()
	<-s.done
	return err
}

type countingWriter struct {
	http.ResponseWriter
	status int
	n      atomic.Int64
	meter  *timeline.Meter // the body's bytes, as progress (nil: none)
}

func (w *countingWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

func (w *countingWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(b)
	w.n.Add(int64(n))
	w.meter.Add(n)
	return n, err
}

// Handler serves what open opens, read-only (GET and HEAD, with Range),
// recording every request on tl.
func Handler(open bootfile.Opener, tl *timeline.Timeline) http.Handler {
	s := &Server{tl: tl}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		addr, _, _ := net.SplitHostPort(r.RemoteAddr)
		detail := map[string]any{"method": r.Method, "path": r.URL.Path, "agent": r.UserAgent()}
		if rg := r.Header.Get("Range"); rg != "" {
			detail["range"] = rg
		}
		s.emit(timeline.Event{Addr: addr, Kind: "request", Msg: r.Method + " " + r.URL.Path, Detail: detail})
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			http.Error(w, "read-only server", http.StatusMethodNotAllowed)
			return
		}
		// Refuse escapes outright rather than letting the path cleaner
		// silently map "/../x" to "/x": the client asked for something
		// outside the root, and the timeline should say so.
		if err := checkPath(r.URL.Path); err != nil {
			detail["error"] = err.Error()
			s.emit(timeline.Event{Addr: addr, Kind: "refused", Msg: r.URL.Path, Detail: detail})
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		start := time.Now()
		cw := &countingWriter{ResponseWriter: w}
		if f, err := open(r.URL.Path, addr); err != nil {
			status := http.StatusForbidden
			if errors.Is(err, fs.ErrNotExist) {
				status = http.StatusNotFound
			}
			detail["error"] = err.Error()
			http.Error(cw, http.StatusText(status), status)
		} else {
			// A reader that ends early (a transfer cut short) leaves the
			// response short of its Content-Length; net/http then drops
			// the connection, as a broken transfer would.
			if path.Ext(r.URL.Path) == ".efi" {
				// UEFI HTTP boot takes a file as an EFI application by
				// this type (else by the .efi in the URL).
				w.Header().Set("Content-Type", "application/efi")
			}
			if r.Method == http.MethodGet {
				cw.meter = s.tl.Meter(timeline.Event{Source: "http", Addr: addr, Msg: r.URL.Path}, f.Size(), true)
			}
			http.ServeContent(cw, r, path.Base(r.URL.Path), f.ModTime, f)
			cw.meter.Close() // its last count before the transfer's end
			f.Close()
		}
		d := time.Since(start)
		detail["status"] = cw.status
		detail["bytes"] = cw.n.Load()
		detail["seconds"] = d.Seconds()
		kind := "transfer"
		if cw.status >= 400 {
			kind = "not-found"
			if cw.status != http.StatusNotFound {
				kind = "error"
			}
		}
		s.emit(timeline.Event{Addr: addr, Kind: kind, Msg: fmt.Sprintf("%s %d %d bytes in %.2fs", r.URL.Path, cw.status, cw.n.Load(), d.Seconds()), Detail: detail})
	})
}

func checkPath(p string) error {
	for _, part := range strings.Split(p, "/") {
		if part == ".." {
			return errors.New("path leaves the served root")
		}
	}
	return nil
}

func (s *Server) emit(e timeline.Event) {
	e.Source = "http"
	s.tl.Emit(e)
}
