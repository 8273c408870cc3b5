package netfab

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
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
	leftMACs := make(chan string, 4)
	ln, err := f.Listen(sock, func(mac net.HardwareAddr) (string, string, Lease, error) {
		learned.Add(1)
		return "g1", filepath.Join(dir, "g1.pcapng"), Lease{IP: netip.MustParseAddr("10.0.2.40"), IP6: netip.MustParseAddr("fd4e:4248::40")}, nil
	}, func(mac net.HardwareAddr) { leftMACs <- mac.String() })
	assert.NilError(t, err)
	fi, err := os.Stat(sock)
	assert.NilError(t, err)
	assert.Equal(t, fi.Mode().Perm(), os.FileMode(0o600), "the socket is not its owner's only")
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

	// A QEMU claiming a MAC no guest may have is refused before the lab
	// is asked to learn it.
	asked := learned.Load()
	for _, bad := range []net.HardwareAddr{f.HostMAC, {0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, {0x01, 0, 0x5e, 0, 0, 1}, {0, 0, 0, 0, 0, 0}} {
		mac = bad
		c3 := join()
		c3.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c3.Read(hdr[:])
		assert.Assert(t, err != nil, "a port claiming %s was let in", bad)
		c3.Close()
	}
	assert.Equal(t, learned.Load(), asked)
	// The guest's QEMU leaves: the lab hears of it, once.
	c.Close()
	select {
	case m := <-leftMACs:
		assert.Equal(t, m, "52:54:00:12:34:56")
	case <-time.After(5 * time.Second):
		t.Fatal("the lab never heard that the QEMU left")
	}

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

// fragmentRecord is one IPv4 fragment a test guest sends: its datagram's
// ID, its offset (in 8-byte units), the more-fragments flag, and its bytes.
type fragmentRecord struct {
	id   uint16
	off  int
	more bool
	data []byte
}

// fragmentFrame is rec as a frame from mac and src to the host.
func fragmentFrame(mac net.HardwareAddr, src netip.Addr, rec fragmentRecord) []byte {
	f := make([]byte, 14+20+len(rec.data))
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], mac)
	binary.BigEndian.PutUint16(f[12:], 0x0800)
	ip := f[14:]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(rec.data)))
	binary.BigEndian.PutUint16(ip[4:], rec.id)
	fl := uint16(rec.off & 0x1fff)
	if rec.more {
		fl |= 0x2000
	}
	binary.BigEndian.PutUint16(ip[6:], fl)
	ip[8], ip[9] = 64, 17
	a := src.As4()
	copy(ip[12:16], a[:])
	copy(ip[16:20], []byte{10, 0, 2, 2})
	copy(ip[20:], rec.data)
	return f
}

// reassembled is what a host could make of the fragments that passed: the
// test's own reassembly, not gVisor's, and a pessimistic one — each
// datagram both with the first copy of overlapping bytes kept and with the
// last, whichever a stack does. A fragment that is not one (no MF, offset
// 0) is a datagram of its own.
func reassembled(passed []fragmentRecord) [][]byte {
	var out [][]byte
	byID := map[uint16][]fragmentRecord{}
	for _, r := range passed {
		if !r.more && r.off == 0 {
			out = append(out, r.data)
			continue
		}
		byID[r.id] = append(byID[r.id], r)
	}
	for _, frags := range byID {
		end := -1
		for _, r := range frags {
			if !r.more {
				end = max(end, r.off*8+len(r.data))
			}
		}
		if end < 0 {
			continue
		}
		for _, lastWins := range []bool{false, true} {
			buf, have := make([]byte, end), make([]bool, end)
			for _, r := range frags {
				for i, b := range r.data {
					at := r.off*8 + i
					if at < end && (lastWins || !have[at]) {
						buf[at], have[at] = b, true
					}
				}
			}
			whole := true
			for _, h := range have {
				whole = whole && h
			}
			if whole {
				out = append(out, buf)
			}
		}
	}
	return out
}

// checkFragments sends recs through the port's security and checks the
// rule on what the host could reassemble from the fragments that passed:
// every UDP datagram to the DHCP server names the port's MAC.
func checkFragments(t *testing.T, port *Port, lease netip.Addr, recs []fragmentRecord) {
	var passed []fragmentRecord
	for _, r := range recs {
		fr := fragmentFrame(port.MAC, lease, r)
		fi, ok := parseFrame(fr)
		if _, why := port.spoofed(fr, fi); ok && why == "" {
			passed = append(passed, r)
		}
	}
	for _, d := range reassembled(passed) {
		if len(d) < 4 || binary.BigEndian.Uint16(d[2:]) != 67 {
			continue
		}
		if len(d) < 8+34 || !bytes.Equal(d[8+28:8+34], port.MAC) {
			t.Fatalf("the host could reassemble DHCP for another client from fragments that passed: % x (of %d sent)", d, len(recs))
		}
	}
}

// dhcpDatagram is a UDP datagram to the DHCP server asking for chaddr.
func dhcpDatagram(chaddr net.HardwareAddr) []byte {
	d := make([]byte, 8+240)
	binary.BigEndian.PutUint16(d[0:], 68)
	binary.BigEndian.PutUint16(d[2:], 67)
	binary.BigEndian.PutUint16(d[4:], uint16(len(d)))
	d[8] = 1
	copy(d[8+28:], chaddr)
	return d
}

// fragmentsOf cuts datagram d at the given byte offsets (multiples of 8).
func fragmentsOf(id uint16, d []byte, cuts ...int) []fragmentRecord {
	var recs []fragmentRecord
	from := 0
	for _, c := range append(cuts, len(d)) {
		recs = append(recs, fragmentRecord{id: id, off: from / 8, more: c < len(d), data: d[from:c]})
		from = c
	}
	return recs
}

// fragmentPort is a bound port on a fresh fabric for the fragment tests.
func fragmentPort(t testing.TB) (*Port, netip.Addr) {
	f, err := New(timeline.New(), Config{})
	assert.NilError(t, err)
	t.Cleanup(func() { f.Close() })
	port, err := f.AddPort("g7", net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 7}, "")
	assert.NilError(t, err)
	lease := netip.MustParseAddr("10.0.2.40")
	port.Bind(lease)
	return port, lease
}

// TestFragmentsCannotCarryForeignDHCP: DHCP snooping holds for what the
// host reassembles, not only for whole frames. The known attacks (a DHCP
// message for another MAC cut before its client address, a first fragment
// too short for its header, a later fragment rewriting an earlier one)
// and thousands of random fragment sets, each checked by the test's own
// reassembly.
func TestFragmentsCannotCarryForeignDHCP(t *testing.T) {
	port, lease := fragmentPort(t)
	victim := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 8}
	foreign := dhcpDatagram(victim)
	own := dhcpDatagram(port.MAC)
	checkFragments(t, port, lease, fragmentsOf(1, foreign, 16))    // cut before chaddr
	checkFragments(t, port, lease, fragmentsOf(2, foreign, 8, 40)) // the header alone first
	// Its own message, then a fragment of the same datagram rewriting
	// the client address.
	rewrite := append(fragmentsOf(3, own, 48), fragmentRecord{id: 3, off: 4, more: true, data: foreign[32:48]})
	checkFragments(t, port, lease, rewrite)
	// A first fragment to another port, then one at offset 0 to 67.
	checkFragments(t, port, lease, []fragmentRecord{{id: 4, off: 0, more: true, data: dhcpDatagram(victim)[:16]}, {id: 4, off: 2, data: foreign[16:]}})
	tiny := []fragmentRecord{{id: 5, off: 0, more: true, data: foreign[:4]}, {id: 5, off: 0, more: true, data: foreign[:16]}, {id: 5, off: 2, data: foreign[16:]}}
	checkFragments(t, port, lease, tiny)

	// Random sets: pieces of foreign and own datagrams at random offsets,
	// flags and IDs.
	rng := rand.New(rand.NewPCG(1, 2))
	for range 20000 {
		var recs []fragmentRecord
		for range 1 + rng.IntN(4) {
			src := foreign
			if rng.IntN(2) == 0 {
				src = own
			}
			off := rng.IntN(len(src)/8) * 8
			n := 1 + rng.IntN(len(src)-off)
			if rng.IntN(2) == 0 {
				n = min(len(src)-off, (1+rng.IntN(6))*8)
			}
			recs = append(recs, fragmentRecord{id: uint16(rng.IntN(2)), off: off / 8, more: off+n < len(src) || rng.IntN(4) == 0, data: src[off : off+n]})
		}
		checkFragments(t, port, lease, recs)
	}
}

// FuzzFragments is TestFragmentsCannotCarryForeignDHCP's check on fragment
// sets the fuzzer makes: records of ID, offset (8-byte units), flags and a
// length, their bytes taken from a DHCP message for another MAC.
func FuzzFragments(f *testing.F) {
	f.Add([]byte{1, 0, 1, 16, 1, 2, 0, 255})
	f.Add([]byte{1, 0, 1, 8, 1, 1, 1, 32, 1, 5, 0, 255})
	port, lease := fragmentPort(f)
	foreign := dhcpDatagram(net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 8})
	f.Fuzz(func(t *testing.T, in []byte) {
		var recs []fragmentRecord
		for ; len(in) >= 4; in = in[4:] {
			off := int(in[1]) % (len(foreign) / 8)
			n := min(len(foreign)-off*8, int(in[3]))
			recs = append(recs, fragmentRecord{id: uint16(in[0] & 1), off: off, more: in[2]&1 == 1, data: foreign[off*8 : off*8+n]})
		}
		checkFragments(t, port, lease, recs)
	})
}

// TestNeighborDiscoverySecurity: a port's guest asks about anyone but
// answers only for its own addresses, names only its own MAC as a
// link-layer address (behind extension headers too), sends no router
// advertisement or redirect, and no IPv6 fragment.
func TestNeighborDiscoverySecurity(t *testing.T) {
	f, err := New(timeline.New(), Config{})
	assert.NilError(t, err)
	defer f.Close()
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 7}
	other := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 8}
	p, err := f.AddPort("g7", mac, "")
	assert.NilError(t, err)
	p.Bind6(netip.MustParseAddr("fd4e:4248::15"))
	own := "fe80::5054:ff:fe4e:4207"
	// icmp6 is an ICMPv6 message of type typ from own, with target and a
	// link-layer option (kind 1 source, 2 target) naming ll, behind the
	// extension headers ext (each a next-header byte; 44 a fragment).
	icmp6 := func(typ byte, target string, optKind byte, ll net.HardwareAddr, ext ...byte) []byte {
		b := append(append([]byte{0x33, 0x33, 0, 0, 0, 1}, mac...), 0x86, 0xdd)
		ip := make([]byte, 40)
		ip[0], ip[7] = 0x60, 255
		a := netip.MustParseAddr(own).As16()
		copy(ip[8:24], a[:])
		copy(ip[24:40], netip.MustParseAddr("ff02::1").AsSlice())
		var body []byte
		next := byte(58)
		for i := len(ext) - 1; i >= 0; i-- {
			h := make([]byte, 8)
			h[0] = next
			body = append(h, body...)
			next = ext[i]
		}
		ip[6] = next
		msg := make([]byte, 24)
		msg[0] = typ
		if target != "" {
			copy(msg[8:24], netip.MustParseAddr(target).AsSlice())
		}
		if ll != nil {
			msg = append(append(msg, optKind, 1), ll...)
		}
		body = append(body, msg...)
		binary.BigEndian.PutUint16(ip[4:], uint16(len(body)))
		return append(append(b, ip...), body...)
	}
	judge := func(fr []byte) string {
		fi, ok := parseFrame(fr)
		assert.Assert(t, ok)
		_, why := p.spoofed(fr, fi)
		return why
	}
	// Allowed: its own answers and questions.
	assert.Equal(t, judge(icmp6(136, own, 2, mac)), "")
	assert.Equal(t, judge(icmp6(136, "fd4e:4248::15", 2, mac)), "")
	assert.Equal(t, judge(icmp6(135, "fd4e:4248::2", 1, mac)), "")
	assert.Equal(t, judge(icmp6(135, "fe80::5054:ff:fe4e:4208", 1, mac)), "") // asking about another is fine
	assert.Equal(t, judge(icmp6(133, "", 1, mac)), "")
	// Refused: answering for another, naming another MAC, a router's.
	assert.Assert(t, is.Contains(judge(icmp6(136, "fd4e:4248::16", 2, mac)), "not its address"))
	assert.Assert(t, is.Contains(judge(icmp6(136, "fe80::5054:ff:fe4e:4208", 2, mac)), "not its address"))
	assert.Assert(t, is.Contains(judge(icmp6(136, own, 2, other)), "naming link-layer address 52:54:00:4e:42:08"))
	assert.Assert(t, is.Contains(judge(icmp6(135, "fd4e:4248::2", 1, other)), "naming link-layer address"))
	assert.Assert(t, is.Contains(judge(icmp6(136, "fd4e:4248::16", 2, mac, 0, 60)), "not its address"), "behind extension headers")
	assert.Assert(t, is.Contains(judge(icmp6(134, "", 1, mac)), "a router's"))
	assert.Assert(t, is.Contains(judge(icmp6(137, own, 0, nil)), "a router's"))
	assert.Assert(t, is.Contains(judge(icmp6(136, own, 2, mac, 44)), "fragmented IPv6"))
	// Behind a header the switch does not read, a host stack still finds
	// the advertisement (gVisor skips the experimental 253): refused.
	for _, ext := range []byte{253, 254, 135, 139, 140, 50} {
		assert.Assert(t, is.Contains(judge(icmp6(136, "fd4e:4248::16", 2, mac, ext)), fmt.Sprintf("next header %d", ext)), "behind %d", ext)
		assert.Assert(t, is.Contains(judge(icmp6(136, "fd4e:4248::16", 2, mac, 0, ext)), fmt.Sprintf("next header %d", ext)), "behind 0, %d", ext)
	}
}

// TestProtectedPorts: a guest's frames reach the boot server only: its
// broadcast and a frame for another guest's MAC never come out of the
// other guest's port.
func TestProtectedPorts(t *testing.T) {
	f, err := New(timeline.New(), Config{})
	assert.NilError(t, err)
	defer f.Close()
	macA, macB := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 1}, net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 2}
	a, err := f.AddPort("a", macA, "")
	assert.NilError(t, err)
	b, err := f.AddPort("b", macB, "")
	assert.NilError(t, err)
	a.Bind(netip.MustParseAddr("10.0.2.41"))
	b.Bind(netip.MustParseAddr("10.0.2.42"))
	send := func(frame []byte) {
		_, err := a.QEMUFile().Write(append(binary.BigEndian.AppendUint32(nil, uint32(len(frame))), frame...))
		assert.NilError(t, err)
	}
	// B speaks first, so the switch knows where its MAC is.
	_, err = b.QEMUFile().Write(func() []byte {
		fr := arpRequestFrame(macB, netip.MustParseAddr("10.0.2.42"), f.HostIP)
		return append(binary.BigEndian.AppendUint32(nil, uint32(len(fr))), fr...)
	}())
	assert.NilError(t, err)
	unicast := udpFrame(macA, netip.MustParseAddr("10.0.2.41"), 9, []byte("to b"))
	copy(unicast[0:6], macB)
	send(arpRequestFrame(macA, netip.MustParseAddr("10.0.2.41"), netip.MustParseAddr("10.0.2.42"))) // broadcast: who has B?
	send(unicast)
	// What B's port delivers for a second: the host's answer to B's own
	// ARP, nothing of A's. (The QEMU end is a blocking descriptor: it is
	// read apart, and ends when the fabric closes it.)
	frames := make(chan []byte, 16)
	go func() {
		q := b.QEMUFile()
		for {
			var hdr [4]byte
			if _, err := io.ReadFull(q, hdr[:]); err != nil {
				return
			}
			fr := make([]byte, binary.BigEndian.Uint32(hdr[:]))
			if _, err := io.ReadFull(q, fr); err != nil {
				return
			}
			frames <- fr
		}
	}()
	deadline := time.After(time.Second)
	for {
		select {
		case fr := <-frames:
			assert.Assert(t, !bytes.Equal(fr[6:12], macA), "b's port delivered a frame of a's: % x", fr)
		case <-deadline:
			return
		}
	}
}

// TestNoIPv6ToTheHostUnderAPolicy: the host filter (an IPsec policy) is
// IPv4's, so under one no IPv6 from a guest reaches the host's services.
func TestNoIPv6ToTheHostUnderAPolicy(t *testing.T) {
	f, err := New(timeline.New(), Config{})
	assert.NilError(t, err)
	defer f.Close()
	fr := make([]byte, 14+40+8)
	binary.BigEndian.PutUint16(fr[12:], 0x86dd)
	fr[14], fr[20] = 0x60, 17
	fi, _ := parseFrame(fr)
	assert.Assert(t, f.filtered(true, fr, fi) != nil, "IPv6 was dropped with no policy")
	f.SetHostFilter(func(toHost bool, ip []byte) []byte { return ip }) // a policy that lets all IPv4 through
	assert.Assert(t, f.filtered(true, fr, fi) == nil, "IPv6 reached the host under a policy")
}

// FuzzIPv6AsTheHostSeesIt: any IPv6 frame the port lets through carries,
// as gVisor's own parser (the host stack's) walks its extension headers,
// the upper layer the switch judged: no header can hide neighbor discovery
// from the checks. The oracle is gVisor's iterator, not the switch's.
func FuzzIPv6AsTheHostSeesIt(f *testing.F) {
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 7}
	frame := func(next byte, rest ...byte) []byte {
		b := append(append([]byte{0x33, 0x33, 0, 0, 0, 1}, mac...), 0x86, 0xdd)
		ip := make([]byte, 40)
		ip[0], ip[6], ip[7] = 0x60, next, 255
		copy(ip[8:24], linkLocalOf(mac).AsSlice())
		copy(ip[24:40], netip.MustParseAddr("ff02::1").AsSlice())
		binary.BigEndian.PutUint16(ip[4:], uint16(len(rest)))
		return append(append(b, ip...), rest...)
	}
	na := append([]byte{136, 0, 0, 0, 0x20, 0, 0, 0}, netip.MustParseAddr("fd4e:4248::16").AsSlice()...)
	f.Add(frame(58, na...))
	f.Add(frame(253, append([]byte{58, 0, 0, 0, 0, 0, 0, 0}, na...)...))
	f.Add(frame(0, append([]byte{60, 0, 0, 0, 0, 0, 0, 0, 253, 0, 0, 0, 0, 0, 0, 0, 58, 0, 0, 0, 0, 0, 0, 0}, na...)...))
	f.Add(frame(0, append([]byte{58, 0, 5, 2, 0, 0, 1, 0}, 143, 0, 0, 0)...)) // MLD behind a router alert
	fab, err := New(timeline.New(), Config{})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { fab.Close() })
	port, err := fab.AddPort("g7", mac, "")
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, fr []byte) {
		fi, ok := parseFrame(fr)
		if !ok || fi.etherType != 0x86dd || len(fr) < 54 {
			return
		}
		if _, why := port.spoofed(fr, fi); why != "" {
			return
		}
		it := header.MakeIPv6PayloadIterator(header.IPv6ExtensionHeaderIdentifier(fr[20]), buffer.MakeWithData(append([]byte(nil), fr[54:]...)))
		defer it.Release()
		for range 64 {
			h, done, err := it.Next()
			if done || err != nil {
				return // the host drops it, or there is nothing past the headers
			}
			raw, isRaw := h.(header.IPv6RawPayloadHeader)
			if !isRaw {
				h.Release()
				continue
			}
			defer raw.Release()
			if uint8(raw.Identifier) != fi.proto {
				t.Fatalf("passed: the host reads upper layer %d where the switch judged %d", raw.Identifier, fi.proto)
			}
			return
		}
	})
}

// TestCaptureKeepsDirection: a port's capture says which frames its guest
// sent (spoofed ones too: they are recorded before the switch drops them)
// and which it received.
func TestCaptureKeepsDirection(t *testing.T) {
	f, err := New(timeline.New(), Config{})
	assert.NilError(t, err)
	defer f.Close()
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 7}
	capture := filepath.Join(t.TempDir(), "c.pcapng")
	p, err := f.AddPort("g7", mac, capture)
	assert.NilError(t, err)
	p.Bind(netip.MustParseAddr("10.0.2.40"))
	q := p.QEMUFile()
	for _, fr := range [][]byte{
		arpRequestFrame(net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 8}, netip.MustParseAddr("10.0.2.41"), f.HostIP), // spoofed
		arpRequestFrame(mac, netip.MustParseAddr("10.0.2.40"), f.HostIP),
	} {
		_, err := q.Write(append(binary.BigEndian.AppendUint32(nil, uint32(len(fr))), fr...))
		assert.NilError(t, err)
	}
	var hdr [4]byte
	_, err = io.ReadFull(q, hdr[:]) // the host's answer
	assert.NilError(t, err)
	reply := make([]byte, binary.BigEndian.Uint32(hdr[:]))
	_, err = io.ReadFull(q, reply)
	assert.NilError(t, err)
	p.Close()
	frames, err := ReadCapture(capture)
	assert.NilError(t, err)
	assert.Equal(t, len(frames), 3)
	assert.Assert(t, !frames[0].Inbound && !frames[1].Inbound && frames[2].Inbound)
	assert.DeepEqual(t, frames[2].Data, reply)
}

// TestListenReplacesAStaleSocket: a socket a killed lab left, which nobody
// listens on, is replaced; a live socket, a regular file and a link are
// not touched.
func TestListenReplacesAStaleSocket(t *testing.T) {
	f, err := New(timeline.New(), Config{})
	assert.NilError(t, err)
	defer f.Close()
	learn := func(net.HardwareAddr) (string, string, Lease, error) { return "", "", Lease{}, errors.New("no") }
	dir := t.TempDir()

	stale := filepath.Join(dir, "stale.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	assert.NilError(t, err)
	l.SetUnlinkOnClose(false)
	l.Close() // the file stays, nobody listens: a killed lab's
	_, err = os.Lstat(stale)
	assert.NilError(t, err)
	ln, err := f.Listen(stale, learn, nil)
	assert.NilError(t, err)
	c, err := net.Dial("unix", stale)
	assert.NilError(t, err, "the replaced socket does not answer")
	c.Close()
	ln.Close()

	live := filepath.Join(dir, "live.sock")
	other, err := net.Listen("unix", live)
	assert.NilError(t, err)
	defer other.Close()
	_, err = f.Listen(live, learn, nil)
	assert.ErrorContains(t, err, "address already in use")

	file := filepath.Join(dir, "file")
	assert.NilError(t, os.WriteFile(file, []byte("mine"), 0o600))
	_, err = f.Listen(file, learn, nil)
	assert.Assert(t, err != nil)
	data, err := os.ReadFile(file)
	assert.NilError(t, err)
	assert.Equal(t, string(data), "mine")
}

// AAVMF's first three frames on the network, as a warm start's snapshot
// kept them: an MLD report (inside a hop-by-hop header), duplicate address
// detection for its link-local address, then its DHCP discover. Only the
// last asks for something.
func TestAnnouncesOnlyWhatWaitsForNoAnswer(t *testing.T) {
	frames := readFrames(t, "testdata/aavmf-first-frames.json")
	assert.Equal(t, len(frames), 3)
	// Independent of the parser: the discover is IPv4, UDP, to port 67.
	last := frames[2]
	assert.Equal(t, binary.BigEndian.Uint16(last[12:]), uint16(0x0800))
	assert.Equal(t, last[23], uint8(17))
	assert.Equal(t, binary.BigEndian.Uint16(last[14+20+2:]), uint16(67))
	for i, f := range frames {
		assert.Equal(t, Announces(f), i < 2, "frame %d", i)
	}
	// A neighbour solicitation from an address asks (for the neighbour).
	ns := bytes.Clone(frames[1])
	ns[22] = 0xfe
	ns[23] = 0x80
	assert.Assert(t, !Announces(ns))
	assert.Assert(t, !Announces(frames[2][:20]), "a cut frame")
}

func readFrames(t *testing.T, path string) [][]byte {
	b, err := os.ReadFile(path)
	assert.NilError(t, err)
	var frames [][]byte
	assert.NilError(t, json.Unmarshal(b, &frames))
	return frames
}

// A held port keeps what the guest sends off the switch, calls back at the
// first frame that asks (not at the announcements before it), and sends
// everything on, in order, at Release: the host answers the ARP request
// only then.
func TestHoldUntilAsked(t *testing.T) {
	f, err := New(timeline.New(), Config{})
	assert.NilError(t, err)
	defer f.Close()
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 0x01}
	capture := filepath.Join(t.TempDir(), "c.pcapng")
	port, err := f.AddPort("g1", mac, capture)
	assert.NilError(t, err)
	defer port.Close()
	asked := make(chan struct{}, 4)
	port.HoldUntilAsked(func() { asked <- struct{}{} })
	qemu, err := net.FileConn(port.QEMUFile())
	assert.NilError(t, err)
	defer qemu.Close()
	send := func(fr []byte) {
		_, err := qemu.Write(append(binary.BigEndian.AppendUint32(nil, uint32(len(fr))), fr...))
		assert.NilError(t, err)
	}
	frames := readFrames(t, "testdata/aavmf-first-frames.json")
	send(frames[0])
	send(frames[1])
	select {
	case <-asked:
		t.Fatal("called back at an announcement")
	case <-time.After(200 * time.Millisecond):
	}
	arp := arpRequest(mac, netip.MustParseAddr("10.0.2.15"), f.HostIP)
	send(arp)
	select {
	case <-asked:
	case <-time.After(5 * time.Second):
		t.Fatal("no call back at the ARP request")
	}
	send(frames[2])
	poll.WaitOn(t, func(poll.LogT) poll.Result {
		if len(port.Held()) == 4 {
			return poll.Success()
		}
		return poll.Continue("%d frames held", len(port.Held()))
	})
	qemu.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	var hdr [4]byte
	_, err = io.ReadFull(qemu, hdr[:])
	assert.Assert(t, errors.Is(err, os.ErrDeadlineExceeded), "the host answered a held frame: %v", err)
	assert.Equal(t, len(asked), 0, "called back twice")

	held := port.Release()
	assert.DeepEqual(t, held, [][]byte{frames[0], frames[1], arp, frames[2]})
	qemu.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		_, err = io.ReadFull(qemu, hdr[:])
		assert.NilError(t, err, "no ARP reply after Release")
		fr := make([]byte, binary.BigEndian.Uint32(hdr[:]))
		_, err = io.ReadFull(qemu, fr)
		assert.NilError(t, err)
		if binary.BigEndian.Uint16(fr[12:]) == 0x0806 && binary.BigEndian.Uint16(fr[20:]) == 2 {
			break // the reply
		}
	}
	assert.Assert(t, port.Held() == nil)
}

// arpRequest is who-has target, tell ip.
func arpRequest(mac net.HardwareAddr, ip, target netip.Addr) []byte {
	b := append([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, mac...)
	b = append(b, 0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1)
	b = append(b, mac...)
	b = append(b, ip.AsSlice()...)
	b = append(b, 0, 0, 0, 0, 0, 0)
	return append(b, target.AsSlice()...)
}

// A guest that only announces itself is not held for ever: at MaxHeld
// frames the hold calls back, and says it overflowed.
func TestHoldOverflows(t *testing.T) {
	f, err := New(timeline.New(), Config{})
	assert.NilError(t, err)
	defer f.Close()
	port, err := f.AddPort("g1", net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 0x01}, "")
	assert.NilError(t, err)
	defer port.Close()
	asked := make(chan struct{}, 1)
	port.HoldUntilAsked(func() { asked <- struct{}{} })
	qemu, err := net.FileConn(port.QEMUFile())
	assert.NilError(t, err)
	defer qemu.Close()
	mld := readFrames(t, "testdata/aavmf-first-frames.json")[0]
	for i := 0; i < MaxHeld; i++ {
		_, err := qemu.Write(append(binary.BigEndian.AppendUint32(nil, uint32(len(mld))), mld...))
		assert.NilError(t, err)
	}
	select {
	case <-asked:
	case <-time.After(5 * time.Second):
		t.Fatal("no call back after MaxHeld announcements")
	}
	assert.Assert(t, port.HoldOverflowed())
	assert.Equal(t, len(port.Release()), MaxHeld)
	assert.Assert(t, !port.HoldOverflowed())
}
