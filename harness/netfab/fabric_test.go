package netfab

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"
	"gotest.tools/v3/poll"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"nbh.dev/nbh/harness/timeline"
)

func TestRouterAdvertChecksum(t *testing.T) {
	mac := net.HardwareAddr{2, 0x4e, 0x42, 0x48, 0, 2}
	for _, managed := range []bool{false, true} {
		f := routerAdvert(mac, managed)
		ip := header.IPv6(f[14:])
		icmp := header.ICMPv6(ip.Payload())
		assert.Equal(t, icmp.Type(), header.ICMPv6RouterAdvert)
		sum := header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: icmp, Src: ip.SourceAddress(), Dst: ip.DestinationAddress()})
		assert.Equal(t, icmp.Checksum(), sum, "gVisor computes another checksum")
		ra := header.NDPRouterAdvert(icmp.MessageBody())
		assert.Equal(t, ra.ManagedAddrConfFlag(), managed)
		assert.Equal(t, ra.RouterLifetime(), routerLifetime*time.Second, "not a default router: EDK2 waits 10 s for one")
	}
}

func FuzzParseFrame(f *testing.F) {
	f.Add(routerAdvert(net.HardwareAddr{2, 0, 0, 0, 0, 1}, true))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		fi, ok := parseFrame(b)
		if ok && fi.l4 > len(b) {
			t.Fatalf("transport offset %d past frame of %d", fi.l4, len(b))
		}
		corrupt(append([]byte(nil), b...), fi) // must not panic either
	})
}

// A QEMU that joins through the socket is a port once its first frame names
// its MAC: the host answers it, its capture starts, a second QEMU with the
// same MAC is refused, and closing removes the socket.
func TestListenLearnsPortsFromTheirFirstFrame(t *testing.T) {
	tl := timeline.New()
	f, err := New(tl, Config{})
	assert.NilError(t, err)
	defer f.Close()
	dir := t.TempDir()
	sock := filepath.Join(dir, "net.sock")
	var learned atomic.Int32
	ln, err := f.Listen(sock, func(mac net.HardwareAddr) (string, string, Lease, error) {
		learned.Add(1)
		return "g1", filepath.Join(dir, "g1.pcapng"), Lease{IP: netip.MustParseAddr("10.0.2.40"), IP6: netip.MustParseAddr("fd4e:4248::40")}, nil
	})
	assert.NilError(t, err)
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x12, 0x34, 0x56}
	join := func() net.Conn {
		c, err := net.Dial("unix", sock)
		assert.NilError(t, err)
		req := arpRequestFrame(mac, netip.MustParseAddr("10.0.2.40"), f.HostIP)
		_, err = c.Write(append(binary.BigEndian.AppendUint32(nil, uint32(len(req))), req...))
		assert.NilError(t, err)
		return c
	}
	c := join()
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var hdr [4]byte
	_, err = c.Read(hdr[:])
	assert.NilError(t, err, "no ARP reply from the host")
	assert.Equal(t, learned.Load(), int32(1))
	f.mu.Lock()
	p := f.macs[mac.String()]
	f.mu.Unlock()
	// Its lease binds it as a port the lab made would be: both addresses,
	// and router advertisements saying "managed".
	assert.Equal(t, *p.ip.Load(), netip.MustParseAddr("10.0.2.40"))
	assert.Equal(t, *p.ip6.Load(), netip.MustParseAddr("fd4e:4248::40"))
	assert.Assert(t, p.managed6.Load())
	_, err = os.Stat(filepath.Join(dir, "g1.pcapng"))
	assert.NilError(t, err)

	c2 := join()
	defer c2.Close()
	c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c2.Read(hdr[:])
	assert.Assert(t, err != nil, "a second port with the same MAC was let in")
	var kinds []string
	for _, e := range tl.Events("") {
		if e.Source == "netfab" {
			kinds = append(kinds, e.Kind)
		}
	}
	assert.DeepEqual(t, kinds, []string{"joined", "refused"})

	assert.NilError(t, ln.Close())
	_, err = os.Stat(sock)
	assert.Assert(t, os.IsNotExist(err), "the socket is still there")
}

// arpRequestFrame asks, from mac, who has the address to.
func arpRequestFrame(mac net.HardwareAddr, from, to netip.Addr) []byte {
	f := make([]byte, 42)
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], mac)
	binary.BigEndian.PutUint16(f[12:], 0x0806)
	binary.BigEndian.PutUint16(f[14:], 1)      // Ethernet
	binary.BigEndian.PutUint16(f[16:], 0x0800) // IPv4
	f[18], f[19] = 6, 4
	binary.BigEndian.PutUint16(f[20:], 1) // request
	copy(f[22:28], mac)
	a, b := from.As4(), to.As4()
	copy(f[28:32], a[:])
	copy(f[38:42], b[:])
	return f
}

// udpFrame is an IPv4/UDP frame from mac and src to the host's port dport.
func udpFrame(mac net.HardwareAddr, src netip.Addr, dport uint16, payload []byte) []byte {
	f := make([]byte, 14+20+8+len(payload))
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], mac)
	binary.BigEndian.PutUint16(f[12:], 0x0800)
	ip := f[14:]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+8+len(payload)))
	ip[8], ip[9] = 64, 17
	a := src.As4()
	copy(ip[12:16], a[:])
	copy(ip[16:20], []byte{255, 255, 255, 255})
	binary.BigEndian.PutUint16(ip[20:], 68)
	binary.BigEndian.PutUint16(ip[22:], dport)
	binary.BigEndian.PutUint16(ip[24:], uint16(8+len(payload)))
	copy(ip[28:], payload)
	return f
}

// A port speaks only as its guest: another source MAC, an address that is
// not its lease (in IPv4 or ARP), or a DHCP message for another hardware
// address is dropped and recorded; its own ARP is answered.
func TestPortSecurity(t *testing.T) {
	tl := timeline.New()
	f, err := New(tl, Config{})
	assert.NilError(t, err)
	defer f.Close()
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 7}
	port, err := f.AddPort("g7", mac, "")
	assert.NilError(t, err)
	port.Bind(netip.MustParseAddr("10.0.2.40"))
	qemu := port.QEMUFile()
	send := func(frame []byte) {
		_, err := qemu.Write(append(binary.BigEndian.AppendUint32(nil, uint32(len(frame))), frame...))
		assert.NilError(t, err)
	}
	other := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 8}
	dhcp := make([]byte, 240)
	dhcp[0], dhcp[1], dhcp[2] = 1, 1, 6
	copy(dhcp[28:], other) // chaddr: another machine
	for _, frame := range [][]byte{
		arpRequestFrame(other, netip.MustParseAddr("10.0.2.41"), f.HostIP), // another MAC
		arpRequestFrame(mac, netip.MustParseAddr("10.0.2.99"), f.HostIP),   // another address
		udpFrame(mac, netip.MustParseAddr("10.0.2.99"), 9, []byte("x")),    // IPv4 from another address
		udpFrame(mac, netip.MustParseAddr("0.0.0.0"), 67, dhcp),            // DHCP for another MAC
		arpRequestFrame(mac, netip.MustParseAddr("10.0.2.40"), f.HostIP),   // its own: answered
	} {
		send(frame)
	}
	qemu.SetReadDeadline(time.Now().Add(5 * time.Second))
	var hdr [4]byte
	_, err = io.ReadFull(qemu, hdr[:])
	assert.NilError(t, err, "its own ARP was not answered")
	reply := make([]byte, binary.BigEndian.Uint32(hdr[:]))
	_, err = io.ReadFull(qemu, reply)
	assert.NilError(t, err)
	assert.Equal(t, net.IP(reply[38:42]).String(), "10.0.2.40", "the answer went to another address")
	var spoofs []string
	for _, e := range tl.Events("") {
		if e.Kind == "spoofed" {
			spoofs = append(spoofs, e.Msg)
		}
	}
	assert.Equal(t, len(spoofs), 4, "%v", spoofs) // the first of each kind
	assert.Assert(t, strings.Contains(spoofs[0], "source MAC 52:54:00:4e:42:08"), spoofs[0])
	assert.Assert(t, strings.Contains(spoofs[1], "ARP from g7's port claims 10.0.2.99"), spoofs[1])
	assert.Assert(t, strings.Contains(spoofs[2], "IPv4 from g7's port with source 10.0.2.99"), spoofs[2])
	assert.Assert(t, strings.Contains(spoofs[3], "DHCP from g7's port for hardware address 52:54:00:4e:42:08"), spoofs[3])
	// A flood of one kind: its 1st, 2nd, 4th, 8th are recorded, and the
	// first of another kind still is.
	for range 8 {
		send(udpFrame(mac, netip.MustParseAddr("10.0.2.99"), 9, []byte("x")))
	}
	send(arpRequestFrame(other, netip.MustParseAddr("10.0.2.41"), f.HostIP))
	poll.WaitOn(t, func(poll.LogT) poll.Result {
		n := 0
		for _, e := range tl.Events("") {
			if e.Kind == "spoofed" {
				n++
			}
		}
		if n < 7 {
			return poll.Continue("%d spoofed events", n)
		}
		return poll.Success()
	}, poll.WithTimeout(5*time.Second))
}

// FuzzPortSecurity judges any frame from a bound port with the fabric's
// port security and checks each frame it lets through against a reading of
// its own: the source MAC is the port's; an IPv4 packet comes from the
// port's lease or 0.0.0.0; ARP names the port's MAC and lease (or
// 0.0.0.0); DHCP to the server asks for the port's MAC (so at most one
// lease per port); nothing but IPv4, ARP and IPv6 passes (a VLAN tag
// cannot hide a header).
func FuzzPortSecurity(f *testing.F) {
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 7}
	eth := func(typ uint16, src net.HardwareAddr, payload []byte) []byte {
		b := append(append(append([]byte{}, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff), src...), byte(typ>>8), byte(typ))
		return append(b, payload...)
	}
	ip := make([]byte, 20+8+240)
	ip[0], ip[9] = 0x45, 17
	copy(ip[12:], []byte{10, 0, 2, 40, 10, 0, 2, 2})
	binary.BigEndian.PutUint16(ip[22:], 67)
	copy(ip[20+8+28:], mac)
	f.Add(eth(0x0800, mac, ip))
	f.Add(eth(0x8100, mac, append([]byte{0, 1, 8, 0}, ip...)))
	arp := make([]byte, 28)
	copy(arp[8:], mac)
	copy(arp[14:], []byte{10, 0, 2, 99})
	f.Add(eth(0x0806, mac, arp))
	f.Add(eth(0x86dd, mac, make([]byte, 40)))
	tl := timeline.New()
	fab, err := New(tl, Config{})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { fab.Close() })
	port, err := fab.AddPort("g7", mac, "")
	if err != nil {
		f.Fatal(err)
	}
	lease := netip.MustParseAddr("10.0.2.40")
	port.Bind(lease)
	f.Fuzz(func(t *testing.T, frame []byte) {
		fi, ok := parseFrame(frame)
		if _, why := port.spoofed(frame, fi); !ok || why != "" {
			return
		}
		if !bytes.Equal(frame[6:12], mac) {
			t.Fatalf("passed source MAC %s", net.HardwareAddr(frame[6:12]))
		}
		fromLease := func(b []byte) bool {
			a := netip.AddrFrom4([4]byte(b))
			return a == lease || a.IsUnspecified()
		}
		switch typ := binary.BigEndian.Uint16(frame[12:14]); typ {
		case 0x0800:
			if len(frame) >= 30 && !fromLease(frame[26:30]) && len(frame) >= 34 {
				t.Fatalf("passed IPv4 from %v", frame[26:30])
			}
			if len(frame) < 34 {
				break
			}
			ihl := int(frame[14]&0x0f) * 4
			l4 := 14 + ihl
			if ihl >= 20 && frame[23] == 17 && binary.BigEndian.Uint16(frame[20:22])&0x1fff == 0 &&
				len(frame) >= l4+8+34 && binary.BigEndian.Uint16(frame[l4+2:]) == 67 && !bytes.Equal(frame[l4+8+28:l4+8+34], mac) {
				t.Fatalf("passed DHCP for %s", net.HardwareAddr(frame[l4+8+28:l4+8+34]))
			}
		case 0x0806:
			if len(frame) >= 42 && (!bytes.Equal(frame[22:28], mac) || !fromLease(frame[28:32])) {
				t.Fatalf("passed ARP for %s / %v", net.HardwareAddr(frame[22:28]), frame[28:32])
			}
		case 0x86dd:
		default:
			t.Fatalf("passed EtherType %#04x", typ)
		}
	})
}

// A full host queue drops frames (gVisor's choice); the fabric says so, once
// per power of two.
func TestHostQueueDropsAreRecorded(t *testing.T) {
	tl := timeline.New()
	ep := &countingEndpoint{Endpoint: channel.New(2, 1514, ""), f: &Fabric{tl: tl}}
	defer ep.Close()
	var pkts stack.PacketBufferList
	for range 5 {
		pkts.PushBack(stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData([]byte("frame"))}))
	}
	n, err := ep.WritePackets(pkts)
	pkts.DecRef()
	assert.Assert(t, err == nil, "%v", err)
	assert.Equal(t, n, 2)
	var msgs []string
	for _, e := range tl.Events("") {
		if e.Kind == "host-queue-full" {
			msgs = append(msgs, e.Msg)
		}
	}
	assert.DeepEqual(t, msgs, []string{"the boot server's send queue was full: 3 frames dropped so far (TCP resends them)"})
}

// TestIPv6PortSecurity: a port's IPv6 comes from the unspecified address,
// its own EUI-64 link-local address or its lease (Bind6), nothing else:
// the DHCPv6 server knows a client by its link-local address.
func TestIPv6PortSecurity(t *testing.T) {
	f, err := New(timeline.New(), Config{})
	assert.NilError(t, err)
	defer f.Close()
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 7}
	p, err := f.AddPort("g7", mac, "")
	assert.NilError(t, err)
	frame := func(src string) []byte {
		b := append(append([]byte{0x33, 0x33, 0, 1, 0, 2}, mac...), 0x86, 0xdd)
		ip := make([]byte, 40+8)
		ip[0], ip[6], ip[7] = 0x60, 17, 1
		binary.BigEndian.PutUint16(ip[4:], 8)
		a := netip.MustParseAddr(src).As16()
		copy(ip[8:24], a[:])
		copy(ip[24:40], netip.MustParseAddr("ff02::1:2").AsSlice())
		return append(b, ip...)
	}
	judge := func(src string) string {
		fr := frame(src)
		fi, ok := parseFrame(fr)
		assert.Assert(t, ok)
		_, why := p.spoofed(fr, fi)
		return why
	}
	assert.Equal(t, judge("::"), "")
	assert.Equal(t, judge("fe80::5054:ff:fe4e:4207"), "")
	assert.Assert(t, is.Contains(judge("fe80::5054:ff:fe4e:4208"), "link-local address fe80::5054:ff:fe4e:4208 of another MAC"))
	assert.Assert(t, is.Contains(judge("fd4e:4248::15"), "it has no IPv6 lease"))
	p.Bind6(netip.MustParseAddr("fd4e:4248::15"))
	assert.Equal(t, judge("fd4e:4248::15"), "")
	assert.Assert(t, is.Contains(judge("fd4e:4248::16"), "its lease is fd4e:4248::15"))
}
