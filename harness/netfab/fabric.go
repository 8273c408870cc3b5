// Package netfab is the lab's user-space Ethernet: a switch whose ports are
// QEMU "-netdev stream" sockets (one socketpair per guest NIC, passed to QEMU
// as a file descriptor, so there are no socket paths and no start-order race),
// and a gVisor network stack plugged into the same switch, where the boot
// services listen. Every frame crossing a guest port is written to that
// guest's pcapng capture, and packet fault rules can drop, delay or corrupt
// frames; each firing is recorded on the timeline.
package netfab

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/internal/guard"
	"nbh.dev/nbh/internal/rules"
)

// Defaults for a lab network. Every lab has its own fabric, so every lab may
// use the same addresses without seeing another.
var (
	defaultSubnet = netip.MustParsePrefix("10.0.2.0/24")
	defaultHostIP = netip.MustParseAddr("10.0.2.2")
	// The IPv6 segment: a unique local /64 (its bits spell "NBH" after
	// fd), the router advertisement's on-link prefix.
	defaultPrefix6 = netip.MustParsePrefix("fd4e:4248::/64")
	defaultHostIP6 = netip.MustParseAddr("fd4e:4248::2")
)

// DefaultMTU is the network's path MTU unless Config says otherwise.
const DefaultMTU = 1500

// hostNIC is the host stack's one NIC, its port on the switch.
const hostNIC tcpip.NICID = 1

// Fabric is one isolated Ethernet segment with a host stack on it. The
// services reach the stack through the Listen and Dial methods, which return
// the standard library's types: gVisor stays inside the fabric.
type Fabric struct {
	HostMAC net.HardwareAddr
	HostIP  netip.Addr
	Subnet  netip.Prefix
	HostIP6 netip.Addr // on Prefix6; the host also has its EUI-64 link-local address
	Prefix6 netip.Prefix

	stack  *stack.Stack
	tl     *timeline.Timeline
	mtu    int
	ep     *channel.Endpoint
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	ports     []*Port
	joining   []*Port // joined through Listen, MAC not yet known
	listeners []io.Closer
	macs      map[string]*Port // learned source MACs
	rules     []*ruleState
	filter    HostFilter
}

// HostFilter sees every IPv4 packet between the guests and the host stack
// (toHost: a guest sent it) and returns the packet to pass on — itself, a
// rewritten one — or nil to drop it. It is where the host stack gets IPsec.
type HostFilter func(toHost bool, ip []byte) []byte

// SetHostFilter installs f (nil removes it).
func (f *Fabric) SetHostFilter(h HostFilter) {
	f.mu.Lock()
	f.filter = h
	f.mu.Unlock()
}

// filtered runs the host filter on an Ethernet frame carrying IPv4, and
// returns the frame to pass on, or nil.
func (f *Fabric) filtered(toHost bool, frame []byte, fi frameInfo) []byte {
	f.mu.Lock()
	h := f.filter
	f.mu.Unlock()
	if h == nil || len(frame) < 14 {
		return frame
	}
	if fi.etherType == 0x86dd && rules.On(rules.IPv6Policy) {
		// The policy is IPv4's, and the services listen on IPv6 too:
		// under a filter, the host takes no IPv6 from guests (a network
		// with a policy boots over IPv4 only), so nothing reaches a
		// service around it.
		if toHost {
			return nil
		}
		return frame
	}
	if fi.etherType != 0x0800 {
		return frame
	}
	ip := h(toHost, frame[14:])
	if ip == nil {
		return nil
	}
	if sameBytes(ip, frame[14:]) {
		return frame // passed as it was
	}
	return append(append(make([]byte, 0, 14+len(ip)), frame[:14]...), ip...)
}

// CheckMTU says whether a fabric can have this MTU: IPv4's minimum
// datagram (576) up to jumbo frames (9000).
func CheckMTU(mtu int) error {
	if mtu < 576 || mtu > 9000 {
		return fmt.Errorf("MTU %d: want 576..9000", mtu)
	}
	return nil
}

// Config varies a fabric.
type Config struct {
	// MTU is the largest IP packet the segment carries (default
	// DefaultMTU): the host stack sends no larger (its TCP offers MTU-40 as
	// its MSS), and larger frames, either way, are dropped at the guest's
	// port and recorded, as a smaller link on the path would drop them.
	MTU int
}

// New starts a fabric with the host at defaultHostIP.
func New(tl *timeline.Timeline, c Config) (*Fabric, error) {
	if c.MTU == 0 {
		c.MTU = DefaultMTU
	}
	if err := CheckMTU(c.MTU); err != nil {
		return nil, fmt.Errorf("netfab: %w", err)
	}
	f := &Fabric{
		HostMAC: net.HardwareAddr{0x02, 0x4e, 0x42, 0x48, 0x00, 0x02},
		HostIP:  defaultHostIP,
		Subnet:  defaultSubnet,
		HostIP6: defaultHostIP6,
		Prefix6: defaultPrefix6,
		tl:      tl,
		mtu:     c.MTU,
		macs:    map[string]*Port{},
	}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	s := stack.New(stack.Options{
		NetworkProtocols: []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol,
			// No duplicate address detection (the addresses are the lab's
			// to give), and the host is no router's client.
			ipv6.NewProtocolWithOptions(ipv6.Options{DADConfigs: stack.DADConfigurations{DupAddrDetectTransmits: 0}, NDPConfigs: ipv6.NDPConfigurations{HandleRAs: ipv6.HandlingRAsDisabled}})},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	// Large windows: boot files are tens of megabytes.
	sack := tcpip.TCPSACKEnabled(true)
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4096, Default: 1 << 20, Max: 8 << 20}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv)
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4096, Default: 1 << 20, Max: 8 << 20}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &snd)

	// The ethernet wrapper subtracts its header from the channel's MTU:
	// give it room for a full 1500-byte IP packet, or gVisor fragments
	// every full-size UDP datagram (TFTP blocks of 1468), and UEFI's and
	// U-Boot's TFTP clients do not reassemble.
	f.ep = channel.New(hostQueue, uint32(f.mtu+14), tcpip.LinkAddress(f.HostMAC))
	if err := s.CreateNIC(hostNIC, ethernet.New(&countingEndpoint{Endpoint: f.ep, f: f})); err != nil {
		return nil, fmt.Errorf("netfab: create NIC: %s", err)
	}
	addr := tcpip.AddrFrom4(f.HostIP.As4())
	if err := s.AddProtocolAddress(hostNIC, tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: addr, PrefixLen: f.Subnet.Bits()},
	}, stack.AddressProperties{}); err != nil {
		return nil, fmt.Errorf("netfab: add address: %s", err)
	}
	for _, a := range []netip.Prefix{netip.PrefixFrom(f.HostIP6, f.Prefix6.Bits()), netip.PrefixFrom(netip.AddrFrom16([16]byte(linkLocal(f.HostMAC))), 64)} {
		if err := s.AddProtocolAddress(hostNIC, tcpip.ProtocolAddress{
			Protocol:          ipv6.ProtocolNumber,
			AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFrom16(a.Addr().As16()), PrefixLen: a.Bits()},
		}, stack.AddressProperties{}); err != nil {
			return nil, fmt.Errorf("netfab: add address %s: %s", a, err)
		}
	}
	// 0/0 as well as the subnet, so replies to limited broadcast have a
	// route; IPv6 everything on the one link (link-local replies too).
	s.SetRouteTable([]tcpip.Route{{Destination: header4Subnet(f.Subnet), NIC: hostNIC}, {Destination: header4Subnet(netip.MustParsePrefix("0.0.0.0/0")), NIC: hostNIC},
		{Destination: header.IPv6EmptySubnet, NIC: hostNIC}})
	f.stack = s
	f.wg.Add(1)
	go f.hostLoop()
	return f, nil
}

func header4Subnet(p netip.Prefix) tcpip.Subnet {
	sn, _ := tcpip.NewSubnet(tcpip.AddrFrom4(p.Masked().Addr().As4()), tcpip.MaskFromBytes(net.CIDRMask(p.Bits(), 32)))
	return sn
}

// MTU is the segment's MTU.
func (f *Fabric) MTU() int { return f.mtu }

// oversize drops a frame larger than the segment's MTU, and says so on the
// timeline (the first time and then every power of two per port).
func (p *Port) oversize(frame []byte, dir Dir) bool {
	if len(frame) <= p.f.mtu+14 {
		return false
	}
	if n := p.bigDrops.Add(1); n&(n-1) == 0 {
		p.f.tl.Emit(timeline.Event{Source: "netfab", Kind: "oversize", Guest: p.Name,
			Msg: fmt.Sprintf("%s frame of %d bytes dropped: the path MTU is %d (%d dropped)", dir, len(frame), p.f.mtu, n)})
	}
	return true
}

// RemoveRules uninstalls the fault rules of guest.
func (f *Fabric) RemoveRules(guest string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	kept := f.rules[:0]
	for _, r := range f.rules {
		if r.Guest != guest {
			kept = append(kept, r)
		}
	}
	clear(f.rules[len(kept):])
	f.rules = kept
}

// AddRule installs a packet fault rule.
func (f *Fabric) AddRule(r Rule) {
	f.mu.Lock()
	f.rules = append(f.rules, &ruleState{Rule: r})
	f.mu.Unlock()
}

// Port is a guest NIC's socket on the switch.
type Port struct {
	Name string
	MAC  net.HardwareAddr

	f        *Fabric
	conn     net.Conn
	qemuEnd  *os.File
	out      chan []byte // frames to the guest, written by one goroutine
	drops    atomic.Int64
	bigDrops atomic.Int64
	pcap     *pcapng
	pcapF    *os.File
	closed   chan struct{}
	once     sync.Once
	learn    Learn                      // set until a port that joined through Listen is named
	joined   bool                       // joined through Listen: its QEMU leaving ends it
	left     func(net.HardwareAddr)     // told when a named joined port's QEMU left
	ip       atomic.Pointer[netip.Addr] // the address it speaks from (Bind)
	ip6      atomic.Pointer[netip.Addr] // the IPv6 address it speaks from (Bind6)
	managed6 atomic.Bool                // router advertisements say: addresses from DHCPv6
	spoofs   [nSpoofKinds]atomic.Int64

	holdMu sync.Mutex
	hold   *hold // frames from the guest held back (HoldFirst)
}

// hold is a port's guest frames kept off the switch, from the first one
// on, until Release.
type hold struct {
	asks     func() // called, once, at the first frame held that asks something
	called   bool
	overflow bool // MaxHeld frames came before one that asks: asks was called for them
	frames   [][]byte
}

// MaxHeld bounds the frames a port holds before one that asks: a guest
// that only announces itself is not held for ever (asks is called, and
// HoldOverflowed says why).
const MaxHeld = 256

// AddPort creates a port for a guest NIC with the given MAC; capture, if not
// empty, is the path of the port's pcapng file.
func (f *Fabric) AddPort(name string, mac net.HardwareAddr, capture string) (*Port, error) {
	if err := CheckGuestMAC(mac, f.HostMAC); err != nil && rules.On(rules.GuestMAC) {
		return nil, fmt.Errorf("netfab: %w", err)
	}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("netfab: socketpair: %w", err)
	}
	ours := os.NewFile(uintptr(fds[0]), "netfab-"+name)
	conn, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		syscall.Close(fds[1])
		return nil, fmt.Errorf("netfab: %w", err)
	}
	p := &Port{Name: name, MAC: mac, f: f, conn: conn, qemuEnd: os.NewFile(uintptr(fds[1]), "qemu-"+name),
		closed: make(chan struct{}), out: make(chan []byte, portQueue)}
	if err := p.capture(capture); err != nil {
		p.Close()
		return nil, err
	}
	f.plug(p)
	f.wg.Add(3)
	go p.readLoop()
	go p.writeLoop()
	go p.advertiseLoop()
	return p, nil
}

// capture starts the port's pcapng file at path ("": none).
func (p *Port) capture(path string) error {
	if path == "" {
		return nil
	}
	pf, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("netfab: capture: %w", err)
	}
	p.pcapF = pf
	if p.pcap, err = newPcapng(&flushWriter{bw: bufio.NewWriterSize(pf, 64<<10)}); err != nil {
		return err
	}
	return nil
}

// plug puts a named port on the switch.
func (f *Fabric) plug(p *Port) {
	f.mu.Lock()
	f.ports = append(f.ports, p)
	f.macs[p.MAC.String()] = p
	f.mu.Unlock()
}

// staleSocket reports whether path is a unix socket nobody listens on
// (connecting is refused): never a file, a link or a live socket.
func staleSocket(path string) bool {
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode()&os.ModeSocket == 0 {
		return false
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return false
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}

// Learn names a port that joined through Listen, from the source MAC of its
// first frame: the port's name, capture path and its guest's lease, or an
// error to refuse it.
type Learn func(mac net.HardwareAddr) (name, capture string, lease Lease, err error)

// Listen lets QEMUs started outside the lab join the segment through a unix
// socket at path (-netdev stream,addr.type=unix,addr.path=PATH): each
// connection becomes a port once its first frame names its MAC (learn), and
// left hears when that port's QEMU went away (nil: nobody listens). QEMU
// 7.2 connects once and never again, so the socket must exist first (a
// later QEMU can reconnect: qemu.StreamReconnect). A socket at path that
// nobody listens on (a killed lab's) is replaced; anything else there is
// an error. Close
// the returned closer to stop accepting and remove the socket; the ports
// stay until they or the fabric close.
func (f *Fabric) Listen(path string, learn Learn, left func(mac net.HardwareAddr)) (io.Closer, error) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if errors.Is(err, syscall.EADDRINUSE) && staleSocket(path) {
		// A socket left by a lab that was killed: nobody answers on it,
		// and a QEMU that reconnects is waiting for this one.
		os.Remove(path)
		ln, err = net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	}
	if err != nil {
		return nil, fmt.Errorf("netfab: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	// Whoever can connect joins the lab's network: the socket is its
	// owner's only, whatever the umask.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("netfab: %w", err)
	}
	f.mu.Lock()
	f.listeners = append(f.listeners, ln)
	f.mu.Unlock()
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			p := &Port{f: f, conn: conn, closed: make(chan struct{}), out: make(chan []byte, portQueue), learn: learn, left: left, joined: true}
			f.mu.Lock()
			f.joining = append(f.joining, p)
			f.mu.Unlock()
			f.wg.Add(3)
			go p.readLoop()
			go p.writeLoop()
			go p.advertiseLoop()
		}
	}()
	return ln, nil
}

// learnFrom names a joining port from its first frame; false refuses it.
func (p *Port) learnFrom(frame []byte) bool {
	if len(frame) < 14 {
		return false
	}
	mac := net.HardwareAddr(append([]byte(nil), frame[6:12]...))
	var name, capture string
	var lease Lease
	err := CheckGuestMAC(mac, p.f.HostMAC)
	if !rules.On(rules.GuestMAC) {
		err = nil
	}
	learned := false
	if err == nil {
		name, capture, lease, err = p.learn(mac)
		learned = err == nil
	}
	p.f.mu.Lock()
	for i, q := range p.f.joining {
		if q == p {
			p.f.joining = append(p.f.joining[:i], p.f.joining[i+1:]...)
			break
		}
	}
	_, taken := p.f.macs[mac.String()]
	p.f.mu.Unlock()
	if err == nil && taken {
		err = fmt.Errorf("%s is already on the segment", mac)
	}
	if err == nil {
		err = p.capture(capture)
	}
	if err != nil {
		p.f.tl.Emit(timeline.Event{Source: "netfab", Kind: "refused", MAC: mac.String(), Msg: "a QEMU that joined through the socket: " + err.Error()})
		if learned && !taken && p.left != nil {
			p.left(mac) // the lab made it a guest: it is gone again
		}
		return false
	}
	p.Name, p.MAC, p.learn = name, mac, nil
	p.SetLease(lease)
	p.f.plug(p)
	p.f.tl.Emit(timeline.Event{Source: "netfab", Kind: "joined", Guest: name, MAC: mac.String(), Msg: "a QEMU joined through the socket"})
	return true
}

// QEMUFile is the socket end QEMU gets (as an inherited descriptor). The
// caller closes it once QEMU has started.
func (p *Port) QEMUFile() *os.File { return p.qemuEnd }

// Close detaches the port and flushes its capture.
func (p *Port) Close() {
	p.once.Do(func() {
		close(p.closed)
		p.conn.Close()
		if p.qemuEnd != nil {
			p.qemuEnd.Close()
		}
		p.f.mu.Lock()
		for i, q := range p.f.joining {
			if q == p {
				p.f.joining = append(p.f.joining[:i], p.f.joining[i+1:]...)
				break
			}
		}
		for i, q := range p.f.ports {
			if q == p {
				p.f.ports = append(p.f.ports[:i], p.f.ports[i+1:]...)
				break
			}
		}
		for k, q := range p.f.macs {
			if q == p {
				delete(p.f.macs, k)
			}
		}
		p.f.mu.Unlock()
		var capErr error
		if p.pcap != nil {
			p.pcap.mu.Lock()
			if fw, ok := p.pcap.w.(*flushWriter); ok && p.pcap.err == nil {
				p.pcap.err = fw.bw.Flush()
			}
			capErr = p.pcap.err
			p.pcap.mu.Unlock()
		}
		if p.pcapF != nil {
			if err := p.pcapF.Close(); capErr == nil {
				capErr = err
			}
		}
		if capErr != nil {
			p.f.tl.Emit(timeline.Event{Source: "netfab", Kind: "capture-error", Guest: p.Name, Msg: "network.pcapng is incomplete: " + capErr.Error()})
		}
	})
}

// readLoop takes frames the guest sends: 4-byte big-endian length, then the
// frame (QEMU's stream netdev framing).
func (p *Port) readLoop() {
	defer p.f.wg.Done()
	if p.joined {
		// The MAC is free for the machine's next QEMU, and the lab hears
		// that the machine left (once it was one).
		defer func() {
			// The lab lets the machine go first, and only then is its
			// MAC free: a QEMU joining again with it meanwhile is
			// refused, never handed a guest on its way out.
			if p.left != nil && p.MAC != nil {
				p.left(p.MAC)
			}
			p.Close()
		}()
	}
	r := bufio.NewReaderSize(p.conn, 256<<10)
	var hdr [4]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return
		}
		n := binary.BigEndian.Uint32(hdr[:])
		if n == 0 || n > 65535 {
			// Framing is lost; nothing sane can follow on this stream.
			p.f.tl.Emit(timeline.Event{Source: "netfab", Kind: "bad-frame", Guest: p.Name, Msg: fmt.Sprintf("frame length %d from QEMU", n)})
			return
		}
		frame := make([]byte, n)
		if _, err := io.ReadFull(r, frame); err != nil {
			return
		}
		if p.learn != nil && !p.learnFrom(frame) {
			p.Close()
			return
		}
		if p.pcap != nil {
			p.pcap.write(time.Now(), frame, false)
		}
		if p.held(frame) {
			continue
		}
		p.f.fromGuestGuarded(p, frame)
	}
}

// HoldUntilAsked holds back what the guest sends from its first frame on,
// and calls asks (in a goroutine of its own) at the first frame that asks
// the network something (Announces says which do not): a firmware's first
// DHCP request, router solicitation or ARP. The frames stay off the switch
// until Release. A warm start saves the machine there (package
// harness/warm) and hands the frames to every guest restored from it.
func (p *Port) HoldUntilAsked(asks func()) {
	p.holdMu.Lock()
	p.hold = &hold{asks: asks}
	p.holdMu.Unlock()
}

// Announces reports whether a frame only tells the network something and
// waits for no answer: an IGMP or MLD report (a host joining a multicast
// group, as a UEFI network stack does as it starts), or a neighbour
// solicitation from the unspecified address (duplicate address
// detection, which an answer would only fail).
func Announces(frame []byte) bool {
	fi, ok := parseFrame(frame)
	if !ok || fi.fragment || fi.l4 == 0 {
		return false
	}
	switch {
	case fi.etherType == 0x0800 && fi.proto == 2:
		return true
	case fi.etherType == 0x86dd && fi.proto == 58:
		switch fi.icmpType {
		case 131, 143: // MLDv1 and MLDv2 reports
			return true
		case 135:
			return netip.AddrFrom16([16]byte(frame[22:38])).IsUnspecified()
		}
	}
	return false
}

// held keeps frame back if the port is holding, and reports whether it
// did.
func (p *Port) held(frame []byte) bool {
	p.holdMu.Lock()
	defer p.holdMu.Unlock()
	h := p.hold
	if h == nil {
		return false
	}
	h.frames = append(h.frames, frame)
	if !h.called && (!Announces(frame) || len(h.frames) >= MaxHeld) {
		h.called, h.overflow = true, Announces(frame)
		go h.asks()
	}
	return true
}

// Release ends a hold: it returns the frames held, in order, and sends
// them on to the switch (unless the port is closed: its guest is gone).
func (p *Port) Release() [][]byte {
	p.holdMu.Lock()
	h := p.hold
	p.hold = nil
	p.holdMu.Unlock()
	if h == nil {
		return nil
	}
	if !p.Closed() {
		for _, f := range h.frames {
			p.f.fromGuestGuarded(p, f)
		}
	}
	return h.frames
}

// HoldOverflowed reports whether the hold ended its wait for a request at
// MaxHeld announcements.
func (p *Port) HoldOverflowed() bool {
	p.holdMu.Lock()
	defer p.holdMu.Unlock()
	return p.hold != nil && p.hold.overflow
}

// Closed reports whether the port was closed.
func (p *Port) Closed() bool {
	select {
	case <-p.closed:
		return true
	default:
		return false
	}
}

// Held is what the guest sent since HoldFirst, so far.
func (p *Port) Held() [][]byte {
	p.holdMu.Lock()
	defer p.holdMu.Unlock()
	if p.hold == nil {
		return nil
	}
	return append([][]byte(nil), p.hold.frames...)
}

// Inject switches frames as if the guest had sent them now (a restored
// machine's frames, sent before its state was saved): recorded in the
// capture and subject to every rule of the port.
func (p *Port) Inject(frames [][]byte) {
	for _, f := range frames {
		if p.pcap != nil {
			p.pcap.write(time.Now(), f, false)
		}
		p.f.fromGuestGuarded(p, append([]byte(nil), f...))
	}
}

// deliver sends a frame to the guest, subject to fault rules.
func (p *Port) deliver(frame []byte) {
	if p.oversize(frame, ToGuest) {
		return
	}
	fi, _ := parseFrame(frame)
	frame, delay, ok := p.f.applyRules(p, ToGuest, frame, fi)
	if !ok {
		return
	}
	if delay > 0 {
		time.AfterFunc(delay, func() { p.write(frame) })
		return
	}
	p.write(frame)
}

// portQueue bounds the frames waiting for a guest that is not reading (its
// receive ring is full, or it is paused): beyond it frames are dropped
// whole, as a switch would, and never cut in the middle, which would lose
// the stream's framing for good.
const portQueue = 4096

func (p *Port) write(frame []byte) {
	select {
	case <-p.closed:
	case p.out <- frame:
	default:
		if n := p.drops.Add(1); n&(n-1) == 0 {
			p.f.tl.Emit(timeline.Event{Source: "netfab", Kind: "queue-full", Guest: p.Name,
				Msg: fmt.Sprintf("guest not reading: %d frames dropped", n)})
		}
	}
}

// writeLoop writes queued frames to QEMU, each whole.
func (p *Port) writeLoop() {
	defer p.f.wg.Done()
	buf := make([]byte, 0, 70000)
	for {
		select {
		case <-p.closed:
			return
		case frame := <-p.out:
			buf = binary.BigEndian.AppendUint32(buf[:0], uint32(len(frame)))
			buf = append(buf, frame...)
			// Recorded before it is written: whatever the guest has read
			// is in its capture already (a test, or a user, reading the
			// answer and then closing the port finds it there).
			if p.pcap != nil {
				p.pcap.write(time.Now(), frame, true)
			}
			if _, err := p.conn.Write(buf); err != nil {
				return
			}
		}
	}
}

// fromGuest switches a frame a guest sent.
func (f *Fabric) fromGuest(p *Port, frame []byte) {
	fi, ok := parseFrame(frame)
	if !ok || p.oversize(frame, FromGuest) {
		return
	}
	if kind, why := p.spoofed(frame, fi); why != "" {
		p.refuse(kind, why)
		return
	}
	frame, delay, ok := f.applyRules(p, FromGuest, frame, fi)
	if !ok {
		return
	}
	send := func() { f.forward(p, frame, fi) }
	if delay > 0 {
		time.AfterFunc(delay, send)
		return
	}
	send()
}

func (f *Fabric) forward(from *Port, frame []byte, fi frameInfo) {
	// IPv6 router solicitation: answer for the absent router.
	if fi.etherType == 0x86dd && fi.proto == 58 && fi.icmpType == 133 {
		if from != nil {
			from.deliver(routerAdvert(f.HostMAC, from.managed6.Load()))
		}
		return
	}
	var targets []*Port
	toHost := false
	switch {
	case from != nil:
		// Protected ports: a guest speaks to the boot server only. Its
		// broadcasts and multicasts go to the host, and a frame for
		// another guest's MAC goes nowhere, so no guest hears another's
		// DHCP, ARP or NDP, or answers them.
		toHost = isGroup(fi.dst) || string(fi.dst) == string(f.HostMAC)
		if !rules.On(rules.ProtectedPorts) {
			f.mu.Lock()
			for _, q := range f.ports {
				if q != from && (isGroup(fi.dst) || string(fi.dst) == string(q.MAC)) {
					targets = append(targets, q)
				}
			}
			f.mu.Unlock()
		}
	case isGroup(fi.dst):
		targets = f.groupTargets(frame, fi)
	default:
		f.mu.Lock()
		if q, ok := f.macs[fi.dst.String()]; ok {
			targets = append(targets, q)
		}
		f.mu.Unlock()
	}
	for _, q := range targets {
		q.deliver(frame)
	}
	if toHost {
		sealed := frame
		if frame = f.filtered(true, frame, fi); frame == nil {
			return
		}
		if from != nil && !sameBytes(frame, sealed) {
			// The filter opened ESP: what was inside is the guest's
			// too, and passes port security as if it came in clear (a
			// DHCP request in another's name inside the guest's own
			// ESP must not reach the server).
			inner, _ := parseFrame(frame)
			if kind, why := from.spoofed(frame, inner); why != "" {
				from.refuse(kind, why+" (inside ESP)")
				return
			}
		}
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(frame)})
		f.ep.InjectInbound(0, pkt)
		pkt.DecRef()
	}
}

// groupTargets are the ports a broadcast or multicast frame of the host's
// goes to: every port, but a DHCP reply only to the port of the client it
// answers (its hardware address), since it carries that guest's boot file
// and root path. A DHCP reply the switch cannot read whole (a fragment)
// goes nowhere.
func (f *Fabric) groupTargets(frame []byte, fi frameInfo) []*Port {
	f.mu.Lock()
	defer f.mu.Unlock()
	if fi.etherType == 0x0800 {
		if fi.fragment {
			f.tl.Emit(timeline.Event{Source: "netfab", Kind: "dropped", Msg: "a fragmented broadcast of the boot server's: nothing it broadcasts may be cut up"})
			return nil
		}
		if ch, ok := dhcpReplyClient(frame, fi); ok && rules.On(rules.DHCPToOwner) {
			if q := f.macs[ch.String()]; q != nil {
				return []*Port{q}
			}
			return nil
		}
	}
	return append([]*Port(nil), f.ports...)
}

// dhcpReplyClient is the client hardware address of a DHCP server's reply
// (UDP 67 to 68); false for any other frame. A reply too short to name its
// client names a client no port has.
func dhcpReplyClient(frame []byte, fi frameInfo) (net.HardwareAddr, bool) {
	if fi.proto != 17 || fi.srcPort != 67 || fi.dstPort != 68 {
		return nil, false
	}
	if fi.l4 == 0 || len(frame) < fi.l4+8+34 {
		return net.HardwareAddr{0, 0, 0, 0, 0, 0}, true
	}
	return net.HardwareAddr(frame[fi.l4+8+28 : fi.l4+8+34]), true
}

// applyRules runs the fault rules on a frame crossing port p.
func (f *Fabric) applyRules(p *Port, dir Dir, frame []byte, fi frameInfo) ([]byte, time.Duration, bool) {
	f.mu.Lock()
	rules := append([]*ruleState(nil), f.rules...)
	f.mu.Unlock()
	var delay time.Duration
	var replays []time.Duration
	for _, r := range rules {
		fire, n := r.match(p.Name, dir, fi)
		if !fire {
			continue
		}
		// Record the first firing and then every power of two, so a rule
		// that drops a whole stream does not flood the timeline.
		if n&(n-1) == 0 {
			f.tl.Emit(timeline.Event{Source: "fault", Kind: "fired", Guest: p.Name, Msg: r.Name,
				Detail: map[string]any{"rule": r.Rule.String(), "count": n, "port": int(fi.dstPort)}})
		}
		switch r.Action {
		case Drop:
			return nil, 0, false
		case Delay:
			delay += r.Delay
		case Corrupt:
			frame = corrupt(frame, fi)
		case Replay:
			replays = append(replays, r.Delay)
		case Limit:
			wait, room := r.pace(time.Now(), len(frame))
			if !room {
				return nil, 0, false
			}
			delay += wait
		}
	}
	for _, d := range replays {
		dup := append([]byte(nil), frame...)
		if dir == ToGuest {
			time.AfterFunc(delay+d, func() { p.write(dup) })
		} else {
			time.AfterFunc(delay+d, func() { f.forward(p, dup, fi) })
		}
	}
	return frame, delay, true
}

// hostQueue bounds the frames the host stack has sent and the fabric has
// not switched yet. gVisor drops a frame silently when this queue is full,
// and TCP then has to recover it: a client that advertises a megabytes-wide
// window (iPXE 1.21) got bursts of over 1,400 segments, lost some with a
// queue of 1,024, and, sending no SACK, crawled through the holes one
// retransmission timeout (200 ms) at a time. 16,384 frames (pointers, not
// buffers) hold several such bursts at once; countingEndpoint reports any
// drop that still happens.
const hostQueue = 16384

// countingEndpoint is the host stack's link, recording the frames it had to
// drop because hostQueue was full.
type countingEndpoint struct {
	*channel.Endpoint
	f     *Fabric
	drops atomic.Int64
}

func (e *countingEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n, err := e.Endpoint.WritePackets(pkts)
	if lost := pkts.Len() - n; err == nil && lost > 0 {
		// Said once per power of two, so a storm does not flood the
		// timeline.
		if total := e.drops.Add(int64(lost)); bits.Len64(uint64(total)) != bits.Len64(uint64(total-int64(lost))) {
			e.f.tl.Emit(timeline.Event{Source: "netfab", Kind: "host-queue-full",
				Msg: fmt.Sprintf("the boot server's send queue was full: %d frames dropped so far (TCP resends them)", total)})
		}
	}
	return n, err
}

// hostLoop switches frames the host stack sends.
func (f *Fabric) hostLoop() {
	defer f.wg.Done()
	for {
		pkt := f.ep.ReadContext(f.ctx)
		if pkt == nil {
			return
		}
		v := pkt.ToView()
		frame := append([]byte(nil), v.AsSlice()...)
		v.Release()
		pkt.DecRef()
		f.fromHost(frame)
	}
}

// fromHost switches a frame the host stack sent, through the host filter.
func (f *Fabric) fromHost(frame []byte) {
	defer guard.Recover("the host stack", f.panicked)
	fi, ok := parseFrame(frame)
	if !ok {
		return
	}
	if frame = f.filtered(false, frame, fi); frame == nil {
		return
	}
	if fi, ok = parseFrame(frame); ok {
		f.forward(nil, frame, fi)
	}
}

// fromGuestGuarded is fromGuest, a panic in it dropping only the frame. On
// the per-frame path: nothing is built unless it panics.
func (f *Fabric) fromGuestGuarded(p *Port, frame []byte) {
	defer guard.Recover(p.Name, f.panicked)
	f.fromGuest(p, frame)
}

// panicked reports a frame whose switching panicked (in a fault rule, the
// host filter): the frame is dropped, the fabric goes on.
func (f *Fabric) panicked(from string, v any, stack []byte) {
	what := "a frame from " + from
	f.tl.Emit(timeline.Event{Source: "netfab", Kind: "panic", Msg: guard.Message(what, v), Detail: map[string]any{"stack": string(stack)}})
}

// Close stops the fabric: ports, host stack and loops.
func (f *Fabric) Close() error {
	f.mu.Lock()
	ports := append(append([]*Port(nil), f.ports...), f.joining...)
	lns := f.listeners
	f.mu.Unlock()
	for _, ln := range lns {
		ln.Close()
	}
	for _, p := range ports {
		p.Close()
	}
	f.cancel()
	f.ep.Close()
	f.stack.Close()
	f.wg.Wait()
	f.stack.Wait()
	return nil
}

type flushWriter struct{ bw *bufio.Writer }

func (w *flushWriter) Write(b []byte) (int, error) { return w.bw.Write(b) }
