package nfs

import (
	"bufio"
	"encoding/binary"
	"net"
	"slices"
	"testing"
	"time"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/timeline"
)

func call(xid, prog, vers, proc uint32, args ...uint32) []byte {
	var b []byte
	for _, v := range []uint32{xid, 0, 2, prog, vers, proc, 0, 0, 0, 0} {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	for _, v := range args {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	return b
}

// reply returns accept_stat and the body of an accepted reply.
func reply(t *testing.T, b []byte, xid uint32) (uint32, []byte) {
	assert.Assert(t, len(b) >= 24, "short reply %x", b)
	be := binary.BigEndian
	assert.Equal(t, be.Uint32(b), xid)
	assert.Equal(t, be.Uint32(b[4:]), uint32(1))
	assert.Equal(t, be.Uint32(b[8:]), uint32(0), "denied")
	return be.Uint32(b[20:]), b[24:]
}

func TestPortmapperTCPAndUDP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assert.NilError(t, err)
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	assert.NilError(t, err)
	tl := timeline.New()
	p := ServePortmapper(ln, []net.PacketConn{pc}, tl)
	defer p.Close()

	// TCP: GETPORT MOUNT v3 tcp, in two record fragments.
	c, err := net.Dial("tcp", ln.Addr().String())
	assert.NilError(t, err)
	defer c.Close()
	msg := call(7, progPortmap, 2, 3, progMount, 3, ipprotoTCP, 0)
	first, second := msg[:10], msg[10:]
	c.Write(append(binary.BigEndian.AppendUint32(nil, uint32(len(first))), first...))
	c.Write(append(binary.BigEndian.AppendUint32(nil, 0x80000000|uint32(len(second))), second...))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	rec, err := readRecord(bufio.NewReader(c), maxRecord)
	assert.NilError(t, err)
	stat, body := reply(t, rec, 7)
	assert.Equal(t, stat, uint32(success))
	assert.Equal(t, binary.BigEndian.Uint32(body), uint32(Port))

	// UDP: NFS over UDP is not offered (port 0); DUMP lists every mapping.
	u, err := net.Dial("udp", pc.LocalAddr().String())
	assert.NilError(t, err)
	defer u.Close()
	u.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 2000)
	u.Write(call(8, progPortmap, 2, 3, progNFS, 3, ipprotoUDP, 0))
	n, err := u.Read(buf)
	assert.NilError(t, err)
	stat, body = reply(t, buf[:n], 8)
	assert.Equal(t, stat, uint32(success))
	assert.Equal(t, binary.BigEndian.Uint32(body), uint32(0))
	u.Write(call(9, progPortmap, 2, 4))
	n, err = u.Read(buf)
	assert.NilError(t, err)
	_, body = reply(t, buf[:n], 9)
	assert.Equal(t, len(body), len(Mappings())*20+4)

	// Wrong program and procedure are answered, not dropped.
	u.Write(call(10, 123456, 1, 0))
	n, _ = u.Read(buf)
	stat, _ = reply(t, buf[:n], 10)
	assert.Equal(t, stat, uint32(progUnavail))
	u.Write(call(11, progPortmap, 2, 9))
	n, _ = u.Read(buf)
	stat, _ = reply(t, buf[:n], 11)
	assert.Equal(t, stat, uint32(procUnavail))
}

// getaddr is an rpcbind GETADDR call (version 3 or 4) for prog and vers
// over netid.
func getaddr(xid, rpcbVers, prog, vers uint32, netid string) []byte {
	b := call(xid, progPortmap, rpcbVers, 3, prog, vers)
	b = append(b, xdrString(netid)...)
	b = append(b, xdrString("")...)    // r_addr
	return append(b, xdrString("")...) // r_owner
}

// TestRpcbindGetAddrOverIPv6: an IPv6 client (the kernel's MOUNT client
// over IPv6) asks rpcbind v4, then v3, for a universal address, which names
// the address it asked on.
func TestRpcbindGetAddrOverIPv6(t *testing.T) {
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	p := ServePortmapper(ln, nil, timeline.New())
	defer p.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	assert.NilError(t, err)
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	ask := func(msg []byte) (uint32, []byte) {
		c.Write(append(binary.BigEndian.AppendUint32(nil, 0x80000000|uint32(len(msg))), msg...))
		rec, err := readRecord(r, maxRecord)
		assert.NilError(t, err)
		return reply(t, rec, binary.BigEndian.Uint32(msg))
	}
	for _, v := range []uint32{4, 3} {
		stat, body := ask(getaddr(20+v, v, progMount, 3, "tcp6"))
		assert.Equal(t, stat, uint32(success))
		assert.DeepEqual(t, body, xdrString("::1.8.1")) // port 2049
	}
	stat, body := ask(getaddr(30, 4, progNFS, 3, "udp6"))
	assert.Equal(t, stat, uint32(success))
	assert.DeepEqual(t, body, xdrString("")) // NFS over UDP is not offered
	stat, body = ask(call(31, progPortmap, 5, 0))
	assert.Equal(t, stat, uint32(progMismatch))
	assert.DeepEqual(t, body, []byte{0, 0, 0, 2, 0, 0, 0, 4})
}

// FuzzPortmapper: whatever the call, the portmapper answers with a
// well-formed reply to the call's XID (accepted, or denied for an RPC
// version mismatch) or drops a message it cannot read; a GETPORT answer
// names only ports the lab registered (or 0), and the lab's mappings never
// change (SET and UNSET are not served).
func FuzzPortmapper(f *testing.F) {
	f.Add(call(1, progPortmap, 2, 3, progMount, 3, ipprotoTCP, 0))
	f.Add(call(2, progPortmap, 2, 4))
	f.Add(getaddr(4, 4, progNFS, 3, "tcp6"))
	f.Add(call(3, progPortmap, 2, 1, 100003, 3, ipprotoTCP, 9999)) // SET
	f.Add([]byte{0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0xff, 0xff, 0xff, 0xff})
	p := &Portmapper{tl: timeline.New()}
	want := Mappings()
	ports := map[uint32]bool{0: true}
	for _, m := range Mappings() {
		ports[m.Port] = true
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r := p.handle(b, "fuzz", "10.0.2.2")
		if !slices.Equal(mappings, want) {
			t.Fatal("a call changed the lab's mappings")
		}
		if r == nil {
			return
		}
		be := binary.BigEndian
		if len(b) < 4 || len(r) < 24 || be.Uint32(r) != be.Uint32(b) || be.Uint32(r[4:]) != 1 {
			t.Fatalf("a reply that is not an RPC reply to the call: %x", r)
		}
		if be.Uint32(r[8:]) == 1 { // denied: only an RPC version mismatch
			if be.Uint32(r[12:]) != 0 {
				t.Fatalf("denied for another reason: %x", r)
			}
			return
		}
		c, err := ParseCall(b)
		if err != nil {
			t.Fatalf("answered a call it cannot parse: %v", err)
		}
		if c.Prog == progPortmap && c.Vers == 2 && c.Proc == 3 && be.Uint32(r[20:]) == success {
			if len(r) != 28 || !ports[be.Uint32(r[24:])] {
				t.Fatalf("GETPORT answered %x", r[24:])
			}
		}
	})
}

// TestCloseWithAClientConnected: a client that never hangs up (a guest that
// powered off) does not keep Close waiting.
func TestCloseWithAClientConnected(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assert.NilError(t, err)
	p := ServePortmapper(ln, nil, timeline.New())
	c, err := net.Dial("tcp", ln.Addr().String())
	assert.NilError(t, err)
	defer c.Close()
	c.Write([]byte{0, 0}) // half a record marker: the server waits for more
	time.Sleep(50 * time.Millisecond)
	done := make(chan struct{})
	go func() {
		p.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close waited on a connected client")
	}
}
