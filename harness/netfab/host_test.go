package netfab_test

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/netfab"
	"nbh.dev/nbh/harness/netfab/netfabtest"
	"nbh.dev/nbh/harness/timeline"
)

// TestRuleDropsNthAndRecords: a peer sends three datagrams to the host; a
// rule drops the second; the host gets the other two, the timeline records
// the firing, and the capture holds what crossed the port.
func TestRuleDropsNthAndRecords(t *testing.T) {
	tl := timeline.New()
	f, err := netfab.New(tl, netfab.Config{})
	assert.NilError(t, err)
	defer f.Close()
	f.AddRule(netfab.Rule{Name: "drop-2nd", Dir: netfab.FromGuest, Proto: "udp", Port: 9, Nth: 2, Action: netfab.Drop})
	capture := filepath.Join(t.TempDir(), "c.pcapng")
	port, err := f.AddPort("g1", net.HardwareAddr{2, 0, 0, 0, 0, 5}, capture)
	assert.NilError(t, err)
	peer, err := netfabtest.NewPeer(port, netip.MustParseAddr("10.0.2.40"))
	assert.NilError(t, err)
	defer peer.Close()

	ln, err := f.ListenUDPAt(netip.AddrPortFrom(f.HostIP, 9))
	assert.NilError(t, err)
	defer ln.Close()
	c, err := gonet.DialUDP(peer.Stack, netfabtest.UDPAddr(netip.MustParseAddr("10.0.2.40"), 0), netfabtest.UDPAddr(f.HostIP, 9), ipv4.ProtocolNumber)
	assert.NilError(t, err)
	defer c.Close()
	for _, m := range []string{"one", "two", "three"} {
		_, err := c.Write([]byte(m))
		assert.NilError(t, err)
		time.Sleep(20 * time.Millisecond) // keep them in order through ARP
	}
	var got []string
	buf := make([]byte, 100)
	for {
		ln.SetReadDeadline(time.Now().Add(time.Second))
		n, _, err := ln.ReadFrom(buf)
		if err != nil {
			break
		}
		got = append(got, string(buf[:n]))
	}
	assert.DeepEqual(t, got, []string{"one", "three"})
	var fired []timeline.Event
	for _, e := range tl.Events("g1") {
		if e.Source == "fault" {
			fired = append(fired, e)
		}
	}
	assert.Equal(t, len(fired), 1)
	assert.Equal(t, fired[0].Msg, "drop-2nd")

	port.Close()
	b, err := os.ReadFile(capture)
	assert.NilError(t, err)
	assert.Equal(t, binary.LittleEndian.Uint32(b), uint32(0x0A0D0D0A), "not a pcapng section header")
	n := 0
	for off := 28 + 20; off+12 <= len(b); {
		typ, l := binary.LittleEndian.Uint32(b[off:]), binary.LittleEndian.Uint32(b[off+4:])
		assert.Equal(t, typ, uint32(6))
		assert.Equal(t, binary.LittleEndian.Uint32(b[off+int(l)-4:]), l, "block length trailer")
		off += int(l)
		n++
	}
	// ARP request and reply, three datagrams (the dropped one was sent).
	assert.Assert(t, n >= 5, "only %d frames captured", n)
	frames, err := netfab.ReadCapture(capture)
	assert.NilError(t, err)
	assert.Equal(t, len(frames), n)
	var one int
	for _, f := range frames {
		if bytes.HasSuffix(f.Data, []byte("one")) {
			one++
		}
	}
	assert.Equal(t, one, 1, "the datagram \"one\" in the capture")
	os.WriteFile(capture, b[:len(b)-3], 0o644)
	_, err = netfab.ReadCapture(capture)
	assert.ErrorContains(t, err, "bad block")
}

// TestHostFilter: the filter sees IPv4 both ways between a guest and the
// host stack and can drop what it refuses; ARP never reaches it.
func TestHostFilter(t *testing.T) {
	tl := timeline.New()
	f, err := netfab.New(tl, netfab.Config{})
	assert.NilError(t, err)
	defer f.Close()
	var toHost, fromHost atomic.Int32
	f.SetHostFilter(func(in bool, ip []byte) []byte {
		assert.Check(t, ip[0]>>4 == 4, "not IPv4: %x", ip[:1])
		if !in {
			fromHost.Add(1)
			return ip
		}
		toHost.Add(1)
		if bytes.Contains(ip, []byte("refuse")) {
			return nil
		}
		if bytes.Contains(ip, []byte("boom")) {
			var short []byte
			_ = short[13] // a filter bug: the frame goes, the fabric stays
		}
		return ip
	})
	port, err := f.AddPort("g1", net.HardwareAddr{2, 0, 0, 0, 0, 6}, "")
	assert.NilError(t, err)
	peer, err := netfabtest.NewPeer(port, netip.MustParseAddr("10.0.2.41"))
	assert.NilError(t, err)
	defer peer.Close()
	ln, err := f.ListenUDPAt(netip.AddrPortFrom(f.HostIP, 9))
	assert.NilError(t, err)
	defer ln.Close()
	c, err := gonet.DialUDP(peer.Stack, netfabtest.UDPAddr(netip.MustParseAddr("10.0.2.41"), 0), netfabtest.UDPAddr(f.HostIP, 9), ipv4.ProtocolNumber)
	assert.NilError(t, err)
	defer c.Close()
	for _, m := range []string{"pass", "refuse", "boom", "pass again"} {
		_, err := c.Write([]byte(m))
		assert.NilError(t, err)
		time.Sleep(20 * time.Millisecond)
	}
	var got []string
	buf := make([]byte, 100)
	for {
		ln.SetReadDeadline(time.Now().Add(time.Second))
		n, from, err := ln.ReadFrom(buf)
		if err != nil {
			break
		}
		got = append(got, string(buf[:n]))
		ln.WriteTo([]byte("echo"), from) // back through the filter
	}
	assert.DeepEqual(t, got, []string{"pass", "pass again"})
	c.SetReadDeadline(time.Now().Add(time.Second))
	n, err := c.Read(buf)
	assert.NilError(t, err)
	assert.Equal(t, string(buf[:n]), "echo")
	assert.Equal(t, toHost.Load(), int32(4))
	assert.Assert(t, fromHost.Load() >= 1)
	var panics []string
	for _, e := range tl.Events("") {
		if e.Kind == "panic" {
			panics = append(panics, e.Msg)
		}
	}
	assert.Equal(t, len(panics), 1)
	assert.Assert(t, strings.Contains(panics[0], "index out of range"), panics[0])
}

// TestMTUAndReplay: a frame over the segment's MTU is dropped at the port
// and recorded; a replay rule delivers a frame and then its copy.
func TestMTUAndReplay(t *testing.T) {
	tl := timeline.New()
	f, err := netfab.New(tl, netfab.Config{MTU: 1000})
	assert.NilError(t, err)
	defer f.Close()
	_, err = netfab.New(tl, netfab.Config{MTU: 100})
	assert.ErrorContains(t, err, "MTU 100")
	port, err := f.AddPort("g1", net.HardwareAddr{2, 0, 0, 0, 0, 7}, "")
	assert.NilError(t, err)
	peer, err := netfabtest.NewPeer(port, netip.MustParseAddr("10.0.2.42"))
	assert.NilError(t, err)
	defer peer.Close()
	f.AddRule(netfab.Rule{Name: "replay", Dir: netfab.FromGuest, Proto: "udp", Port: 9, Action: netfab.Replay, Delay: 10 * time.Millisecond})
	ln, err := f.ListenUDPAt(netip.AddrPortFrom(f.HostIP, 9))
	assert.NilError(t, err)
	defer ln.Close()
	c, err := gonet.DialUDP(peer.Stack, netfabtest.UDPAddr(netip.MustParseAddr("10.0.2.42"), 0), netfabtest.UDPAddr(f.HostIP, 9), ipv4.ProtocolNumber)
	assert.NilError(t, err)
	defer c.Close()
	for _, n := range []int{1200, 900} {
		_, err := c.Write(bytes.Repeat([]byte{'x'}, n))
		assert.NilError(t, err)
	}
	var got []int
	buf := make([]byte, 2000)
	for {
		ln.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		n, _, err := ln.ReadFrom(buf)
		if err != nil {
			break
		}
		got = append(got, n)
	}
	assert.DeepEqual(t, got, []int{900, 900})
	var oversize []string
	for _, e := range tl.Events("g1") {
		if e.Kind == "oversize" {
			oversize = append(oversize, e.Msg)
		}
	}
	assert.Equal(t, len(oversize), 1, "%v", oversize)
	assert.Check(t, strings.Contains(oversize[0], "1242 bytes"), oversize[0])
}

// TestListenUDPBroadcast: DHCPv4's socket hears a client and answers it at
// limited broadcast — the answer reaching the client's port only, not a
// second guest's listening on the same port; the IPv6 group socket refuses
// what is not a multicast group; DialUDP refuses a peer of the other
// family.
func TestListenUDPBroadcast(t *testing.T) {
	tl := timeline.New()
	f, err := netfab.New(tl, netfab.Config{})
	assert.NilError(t, err)
	defer f.Close()
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 8}
	client := func(mac net.HardwareAddr, ip string) net.PacketConn {
		port, err := f.AddPort(mac.String(), mac, "")
		assert.NilError(t, err)
		peer, err := netfabtest.NewPeer(port, netip.MustParseAddr(ip))
		assert.NilError(t, err)
		t.Cleanup(peer.Close)
		// Bound to the port alone, as a DHCP client is, to hear broadcast.
		c, err := gonet.DialUDP(peer.Stack, &tcpip.FullAddress{Port: 68}, nil, ipv4.ProtocolNumber)
		assert.NilError(t, err)
		t.Cleanup(func() { c.Close() })
		return c
	}
	c := client(mac, "10.0.2.43")
	other := client(net.HardwareAddr{2, 0, 0, 0, 0, 9}, "10.0.2.44")

	srv, err := f.ListenUDPBroadcast(67)
	assert.NilError(t, err)
	defer srv.Close()
	// A BOOTP message: op, then the client hardware address at 28.
	bootp := func(op byte, mac net.HardwareAddr) []byte {
		m := make([]byte, 240)
		m[0] = op
		copy(m[28:], mac)
		return m
	}
	_, err = c.WriteTo(bootp(1, mac), &net.UDPAddr{IP: net.IP(f.HostIP.AsSlice()), Port: 67})
	assert.NilError(t, err)
	buf := make([]byte, 300)
	srv.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, _, err := srv.ReadFrom(buf)
	assert.NilError(t, err)
	assert.DeepEqual(t, buf[:n], bootp(1, mac))
	for _, to := range []net.HardwareAddr{{2, 0, 0, 0, 0, 7}, mac} { // nobody's, then the client's
		_, err = srv.WriteTo(bootp(2, to), &net.UDPAddr{IP: net.IPv4bcast, Port: 68})
		assert.NilError(t, err)
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, _, err = c.ReadFrom(buf)
	assert.NilError(t, err)
	assert.DeepEqual(t, buf[:n], bootp(2, mac))
	other.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	n, _, err = other.ReadFrom(buf)
	assert.Assert(t, err != nil, "another guest's port heard a DHCP reply: % x", buf[:n])

	g, err := f.ListenUDPGroup(netip.MustParseAddr("ff02::1:2"), 547)
	assert.NilError(t, err)
	g.Close()
	_, err = f.ListenUDPGroup(f.HostIP6, 547)
	assert.ErrorContains(t, err, "not an IPv6 multicast group")
	_, err = f.DialUDP(f.HostIP, netip.AddrPortFrom(netip.MustParseAddr("fd4e:4248::15"), 69))
	assert.ErrorContains(t, err, "not the same IP family")
}

// TestNoDHCPInsideESP: a guest with its own SA wraps a DHCP request in
// another's name in ESP: the gateway opens it (DHCP is in clear by the
// policy), and port security checks what was inside as if it came in
// clear: nothing reaches the DHCP server.
func TestNoDHCPInsideESP(t *testing.T) {
	f, err := netfab.New(timeline.New(), netfab.Config{})
	assert.NilError(t, err)
	defer f.Close()
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 7}
	me := netip.MustParseAddr("10.0.2.40")
	port, err := f.AddPort("g7", mac, "")
	assert.NilError(t, err)
	port.Bind(me)
	key := make([]byte, 20)
	sa, err := ipsec.NewSA(0x1234, key)
	assert.NilError(t, err)
	guestSA, err := ipsec.NewSA(0x1234, key)
	assert.NilError(t, err)
	gw := ipsec.NewGateway(ipsec.Required())
	gw.AddPeer(&ipsec.Peer{Addr: me, In: sa, Out: sa})
	f.SetHostFilter(func(toHost bool, ip []byte) []byte {
		if toHost {
			return gw.Inbound(ip)
		}
		return gw.Outbound(ip)
	})
	srv, err := f.ListenUDPBroadcast(67)
	assert.NilError(t, err)
	defer srv.Close()
	// A BOOTP request from the guest's address to the server, whole, for
	// chaddr, in ESP.
	request := func(chaddr net.HardwareAddr) []byte {
		bootp := make([]byte, 240)
		bootp[0], bootp[1], bootp[2] = 1, 1, 6
		copy(bootp[28:], chaddr)
		udp := append(binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(nil, 68), 67), 0, byte(8+len(bootp)), 0, 0)
		udp[4] = byte((8 + len(bootp)) >> 8)
		ip := make([]byte, 20)
		ip[0], ip[8], ip[9] = 0x45, 64, 17
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(udp)+len(bootp)))
		copy(ip[12:], me.AsSlice())
		copy(ip[16:], f.HostIP.AsSlice())
		esp, err := ipsec.Encap(guestSA, append(append(ip, udp...), bootp...))
		assert.NilError(t, err)
		eth := append(append(append([]byte(nil), f.HostMAC...), mac...), 0x08, 0x00)
		return append(eth, esp...)
	}
	for _, fr := range [][]byte{request(net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 8})} {
		_, err := port.QEMUFile().Write(append(binary.BigEndian.AppendUint32(nil, uint32(len(fr))), fr...))
		assert.NilError(t, err)
	}
	buf := make([]byte, 600)
	srv.SetReadDeadline(time.Now().Add(time.Second))
	n, _, err := srv.ReadFrom(buf)
	assert.Assert(t, err != nil, "DHCP in another's name inside ESP reached the server: chaddr %s", net.HardwareAddr(buf[28:34][:min(6, max(0, n-28))]))
}
