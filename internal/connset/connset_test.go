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
