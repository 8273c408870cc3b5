package netfab

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"

	"nbh.dev/nbh/harness/timeline"
)

// Port security, as a switch with port security and DHCP snooping does it:
// a port speaks only as its guest. Its frames carry the port's MAC; its IPv4
// packets and ARP come from the address the lab leased it (or 0.0.0.0,
// before it has one); its DHCP messages ask for the port's MAC. Anything
// else is dropped and recorded: one guest cannot pose as another, or make
// up machines to drain the DHCP pool.

// Bind fixes the IPv4 address the port's guest speaks from (its lease).
func (p *Port) Bind(ip netip.Addr) { p.ip.Store(&ip) }

// Bind6 fixes the IPv6 address the port's guest speaks from besides its
// link-local one (its DHCPv6 lease).
func (p *Port) Bind6(ip netip.Addr) { p.ip6.Store(&ip) }

// Lease is what the lab leases a port's guest: the addresses it may speak
// from (invalid: not bound). A guest with an IPv6 lease gets router
// advertisements that say "managed" (ManagedV6): its address comes from
// DHCPv6.
type Lease struct{ IP, IP6 netip.Addr }

// SetLease binds the port to its guest's lease, whichever way it joined.
func (p *Port) SetLease(l Lease) {
	if l.IP.IsValid() {
		p.Bind(l.IP)
	}
	p.ManagedV6(l.IP6.IsValid())
	if l.IP6.IsValid() {
		p.Bind6(l.IP6)
	}
}

// The kinds of spoofing, each counted on its own so that one kind's flood
// does not hide the first of another.
const (
	spoofSourceMAC = iota
	spoofARPMAC
	spoofARPIP
	spoofIPv4Source
	spoofDHCPClient
	spoofEtherType
	spoofIPv6Source
	nSpoofKinds
)

// spoofed says why a frame from the port is not its guest's, and which kind
// of spoofing that is; why is "" for a frame of its guest's.
func (p *Port) spoofed(frame []byte, fi frameInfo) (kind int, why string) {
	if !bytes.Equal(fi.src, p.MAC) {
		return spoofSourceMAC, fmt.Sprintf("source MAC %s on %s's port (%s)", fi.src, p.Name, p.MAC)
	}
	var bound netip.Addr
	if b := p.ip.Load(); b != nil {
		bound = *b
	}
	okIP := func(b []byte) (netip.Addr, bool) {
		a := netip.AddrFrom4([4]byte(b))
		return a, a.IsUnspecified() || !bound.IsValid() || a == bound
	}
	switch fi.etherType {
	case 0x0806: // ARP: sender hardware and protocol address
		if len(frame) < 42 {
			return 0, ""
		}
		if !bytes.Equal(frame[22:28], p.MAC) {
			return spoofARPMAC, fmt.Sprintf("ARP from %s's port names hardware address %s", p.Name, net.HardwareAddr(frame[22:28]))
		}
		if a, ok := okIP(frame[28:32]); !ok {
			return spoofARPIP, fmt.Sprintf("ARP from %s's port claims %s (its lease is %s)", p.Name, a, bound)
		}
	case 0x0800:
		if len(frame) < 34 {
			return 0, ""
		}
		if a, ok := okIP(frame[26:30]); !ok {
			return spoofIPv4Source, fmt.Sprintf("IPv4 from %s's port with source %s (its lease is %s)", p.Name, a, bound)
		}
		// DHCP to the server: the client hardware address is the port's.
		if fi.proto == 17 && fi.dstPort == 67 && fi.l4 > 0 && len(frame) >= fi.l4+8+34 {
			if ch := frame[fi.l4+8+28 : fi.l4+8+34]; !bytes.Equal(ch, p.MAC) {
				return spoofDHCPClient, fmt.Sprintf("DHCP from %s's port for hardware address %s", p.Name, net.HardwareAddr(ch))
			}
		}
	case 0x86dd:
		// IPv6: from the unspecified address (duplicate address
		// detection), the port's own EUI-64 link-local address (the DHCPv6
		// server knows a client by it), or its lease.
		if len(frame) < 14+40 {
			return 0, ""
		}
		src, _ := netip.AddrFromSlice(frame[22:38])
		var bound6 netip.Addr
		if b := p.ip6.Load(); b != nil {
			bound6 = *b
		}
		switch {
		case src.IsUnspecified():
		case src.IsLinkLocalUnicast():
			if b := src.As16(); b[11] == 0xff && b[12] == 0xfe &&
				!bytes.Equal([]byte{b[8] ^ 2, b[9], b[10], b[13], b[14], b[15]}, p.MAC) {
				return spoofIPv6Source, fmt.Sprintf("IPv6 from %s's port with the link-local address %s of another MAC", p.Name, src)
			}
		case bound6.IsValid() && src != bound6:
			return spoofIPv6Source, fmt.Sprintf("IPv6 from %s's port with source %s (its lease is %s)", p.Name, src, bound6)
		case !bound6.IsValid() && src.IsGlobalUnicast():
			return spoofIPv6Source, fmt.Sprintf("IPv6 from %s's port with source %s (it has no IPv6 lease)", p.Name, src)
		}
	default:
		// The lab's network carries IPv4, ARP and IPv6. Anything else —
		// an 802.1Q tag above all, which would hide an IPv4 header from
		// the checks above — is not a guest's to send.
		return spoofEtherType, fmt.Sprintf("EtherType %#04x from %s's port (only IPv4, ARP and IPv6 are carried)", fi.etherType, p.Name)
	}
	return 0, ""
}

// refuse records a spoofed frame: the first of each kind on a port, then
// every power of two, so a flood does not flood the timeline.
func (p *Port) refuse(kind int, why string) {
	if n := p.spoofs[kind].Add(1); n&(n-1) == 0 {
		p.f.tl.Emit(timeline.Event{Source: "netfab", Kind: "spoofed", Guest: p.Name, MAC: p.MAC.String(),
			Msg: fmt.Sprintf("%s: dropped (%d so far)", why, n), Detail: map[string]any{"count": n}})
	}
}
