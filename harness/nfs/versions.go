package nfs

import (
	"bufio"
	"encoding/binary"
	"net"
	"strconv"
	"sync"

	"nbh.dev/nbh/harness/timeline"
)

// maxCall bounds one RPC call record: an NFS WRITE carries up to the 1 MiB
// wsize the client negotiates, plus headers.
const maxCall = 4 << 20

// versionGate answers calls for versions the server does not speak with
// PROG_MISMATCH (3..3), as RFC 5531 says a server must, before go-nfs sees
// them. go-nfs dispatches on program and procedure only, so an NFSv4 client
// (mount.nfs tries v4 first unless told vers=3) got NULL answered as if it
// were v3 and then garbage for its COMPOUND, and failed with EIO instead of
// falling back to v3.
type versionGate struct {
	net.Conn
	rd   *bufio.Reader
	emit func(timeline.Event)

	pending []byte // the rest of a passed call, for go-nfs's reads
	done    func() // forgets the connection (gateListener)
	peer    string // the client's host, from its accept

	mu     sync.Mutex // writes: go-nfs's replies and the gate's own
	out    recordTracker
	queued [][]byte // the gate's replies waiting for a record boundary
	werr   error
}

func newVersionGate(c net.Conn, emit func(timeline.Event)) *versionGate {
	return &versionGate{Conn: c, rd: bufio.NewReaderSize(c, 64<<10), emit: emit}
}

// Read hands go-nfs whole calls it can serve, one record at a time.
func (g *versionGate) Read(p []byte) (int, error) {
	for len(g.pending) == 0 {
		rec, err := readRecord(g.rd, maxCall)
		if err != nil {
			return 0, err
		}
		if reply := g.check(rec); reply != nil {
			if err := g.inject(reply); err != nil {
				return 0, err
			}
			continue
		}
		g.pending = binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(rec)), uint32(len(rec))|1<<31)
		g.pending = append(g.pending, rec...)
	}
	n := copy(p, g.pending)
	g.pending = g.pending[n:]
	return n, nil
}

// check returns the gate's reply to a call it answers itself, else nil.
func (g *versionGate) check(rec []byte) []byte {
	c, err := ParseCall(rec)
	if err != nil || (c.Prog != progNFS && c.Prog != progMount) || c.Vers == 3 {
		return nil // go-nfs answers (or rejects) it
	}
	name := map[uint32]string{progNFS: "NFS", progMount: "MOUNT"}[c.Prog]
	g.emit(timeline.Event{Kind: "version-mismatch", Addr: addrOf(g.RemoteAddr()),
		Msg: name + " version " + strconv.FormatUint(uint64(c.Vers), 10) + " asked; this server speaks version 3 only (PROG_MISMATCH)"})
	return withRecordMark(acceptedReply(c.XID, progMismatch, binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 3), 3)))
}

// Write passes go-nfs's replies through, then any of the gate's own that
// were waiting for the reply in progress to end.
func (g *versionGate) Write(b []byte) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	n, err := g.Conn.Write(b)
	g.out.feed(b[:n])
	if err != nil {
		g.werr = err
		return n, err
	}
	return n, g.flushQueued()
}

func (g *versionGate) inject(reply []byte) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.queued = append(g.queued, reply)
	return g.flushQueued()
}

// flushQueued writes the gate's replies if the stream is between records.
// Called with mu held.
func (g *versionGate) flushQueued() error {
	if g.werr != nil {
		return g.werr
	}
	for len(g.queued) > 0 && g.out.atBoundary() {
		if _, err := g.Conn.Write(g.queued[0]); err != nil {
			g.werr = err
			return err
		}
		g.queued = g.queued[1:]
	}
	return nil
}

func withRecordMark(msg []byte) []byte {
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(msg))|1<<31), msg...)
}

// recordTracker follows RPC record marking in a written byte stream, to know
// when a record has been written whole.
type recordTracker struct {
	hdr  []byte // a partial fragment header
	left int    // bytes of the current fragment still to come
	last bool   // the current fragment ends its record
	mid  bool   // inside a record
}

func (t *recordTracker) feed(b []byte) {
	for len(b) > 0 {
		if t.left == 0 {
			need := 4 - len(t.hdr)
			k := min(need, len(b))
			t.hdr = append(t.hdr, b[:k]...)
			b = b[k:]
			t.mid = true
			if len(t.hdr) < 4 {
				return
			}
			v := binary.BigEndian.Uint32(t.hdr)
			t.hdr = t.hdr[:0]
			t.left = int(v & 0x7fffffff)
			t.last = v&(1<<31) != 0
			if t.left == 0 && t.last {
				t.mid = false
			}
			continue
		}
		k := min(t.left, len(b))
		t.left -= k
		b = b[k:]
		if t.left == 0 && t.last {
			t.mid = false
		}
	}
}

func (t *recordTracker) atBoundary() bool { return !t.mid }

// gateListener wraps each accepted connection in a versionGate.
type gateListener struct {
	net.Listener
	emit func(timeline.Event)

	mu     sync.Mutex
	conns  map[*versionGate]bool // open, for closeAll
	closed bool
}

func (l *gateListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	g := newVersionGate(c, l.emit)
	g.peer = addrOf(c.RemoteAddr()) // now: a connection already reset has no address
	g.done = func() {
		l.mu.Lock()
		delete(l.conns, g)
		l.mu.Unlock()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		c.Close()
		return nil, net.ErrClosed
	}
	if l.conns == nil {
		l.conns = map[*versionGate]bool{}
	}
	l.conns[g] = true
	return g, nil
}

// closeAll stops accepting and cuts the connections still open: go-nfs
// serves each until its client closes it, and a guest that powered off
// never does.
func (l *gateListener) closeAll() error {
	l.mu.Lock()
	l.closed = true
	conns := make([]*versionGate, 0, len(l.conns))
	for g := range l.conns {
		conns = append(conns, g)
	}
	l.mu.Unlock()
	err := l.Listener.Close()
	for _, g := range conns {
		g.Conn.Close()
	}
	return err
}

// closeFrom cuts the open connections from the host ip.
func (l *gateListener) closeFrom(ip string) int {
	l.mu.Lock()
	var conns []*versionGate
	for g := range l.conns {
		if g.peer == ip {
			conns = append(conns, g)
		}
	}
	l.mu.Unlock()
	for _, g := range conns {
		g.Conn.Close()
	}
	return len(conns)
}

// Close closes the connection and forgets it.
func (g *versionGate) Close() error {
	if g.done != nil {
		g.done()
	}
	return g.Conn.Close()
}
