// Package connset serves a listener's connections, each on its own
// goroutine, and on Close cuts those still open: a guest that powered off
// never closes its own, and a server must not wait on it for ever.
package connset

import (
	"net"
	"sync"

	"nbh.dev/nbh/internal/guard"
)

// Set is the connections of one listener. The zero value is ready to use.
type Set struct {
	// Report hears a handler that panicked (guard.Recover): the
	// connection is closed and the others go on.
	Report guard.Report
	// PerPeer bounds the connections one peer host may hold open at once
	// (0: no bound): one more is closed at once, and Refused hears of it.
	// What a server holds per connection times PerPeer is what one guest
	// can make it hold.
	PerPeer int
	Refused func(peer string)

	ln     net.Listener
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  map[net.Conn]string // open, with the peer's host (taken at accept: a closed one has no address)
	closed bool
}

// Serve accepts from ln until it fails, running handle on each connection
// in a goroutine of its own and closing the connection after.
func (s *Set) Serve(ln net.Listener, handle func(net.Conn)) {
	s.mu.Lock()
	s.ln = ln
	if s.conns == nil {
		s.conns = map[net.Conn]string{}
	}
	s.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			if s.closed {
				s.mu.Unlock()
				c.Close()
				return
			}
			peer := peerHost(c)
			if s.PerPeer > 0 && s.openFrom(peer) >= s.PerPeer {
				s.mu.Unlock()
				c.Close()
				if s.Refused != nil {
					s.Refused(peer)
				}
				continue
			}
			s.conns[c] = peer
			s.wg.Add(1)
			s.mu.Unlock()
			go func() {
				defer s.wg.Done()
				guard.Run("connection from "+peer, s.Report, func() { handle(c) })
				c.Close()
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
			}()
		}
	}()
}

// CloseFrom cuts the open connections whose peer is the host ip (a guest
// that closed: it will never close them itself) and says how many.
func (s *Set) CloseFrom(ip string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for c, host := range s.conns {
		if host == ip {
			c.Close()
			n++
		}
	}
	return n
}

// openFrom counts the open connections of peer (s.mu held).
func (s *Set) openFrom(peer string) int {
	n := 0
	for _, host := range s.conns {
		if host == peer {
			n++
		}
	}
	return n
}

// peerHost is the host of c's peer, "" if c has no address (a gVisor
// connection already reset has none).
func peerHost(c net.Conn) string {
	a := c.RemoteAddr()
	if a == nil {
		return ""
	}
	host, _, _ := net.SplitHostPort(a.String())
	return host
}

// Close cuts every open connection, closes the listener and waits for the
// handlers to return.
func (s *Set) Close() error {
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	ln := s.ln
	s.mu.Unlock()
	var err error
	if ln != nil {
		err = ln.Close()
	}
	s.wg.Wait()
	return err
}
