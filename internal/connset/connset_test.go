package connset

import (
	"io"
	"net"
	"testing"
	"time"
)

// TestCloseFrom: the connections of one peer host are cut, the handlers
// return, and the others' stay.
func TestCloseFrom(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var s Set
	ended := make(chan struct{}, 4)
	s.Serve(ln, func(c net.Conn) {
		io.Copy(io.Discard, c) // until cut
		ended <- struct{}{}
	})
	defer s.Close()
	for range 2 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		s.mu.Lock()
		n := len(s.conns)
		s.mu.Unlock()
		if n == 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := s.CloseFrom("10.9.9.9"); n != 0 {
		t.Fatalf("cut %d connections of another host", n)
	}
	if n := s.CloseFrom("127.0.0.1"); n != 2 {
		t.Fatalf("cut %d connections, want 2", n)
	}
	for range 2 {
		select {
		case <-ended:
		case <-time.After(5 * time.Second):
			t.Fatal("a handler still runs after its connection was cut")
		}
	}
}

// addressless is a connection that has lost its addresses (gVisor's, once
// its peer reset it): asking for them gives nil.
type addressless struct{ net.Conn }

func (addressless) RemoteAddr() net.Addr { return nil }

type addresslessListener struct{ net.Listener }

func (l addresslessListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return addressless{c}, nil
}

// TestConnectionWithoutAddress: a guest that resets its connection at once
// leaves one without an address; serving it, and cutting by host, must not
// crash the process.
func TestConnectionWithoutAddress(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var s Set
	served := make(chan struct{}, 1)
	s.Serve(addresslessListener{ln}, func(c net.Conn) { served <- struct{}{} })
	defer s.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case <-served:
	case <-time.After(5 * time.Second):
		t.Fatal("not served")
	}
	s.CloseFrom("127.0.0.1")
}
