package netfab

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"

	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/internal/rules"
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
	spoofFragment
	spoofNDP
	spoofRouter
	spoofMAC
	nSpoofKinds
)

// spoofed says why a frame from the port is not its guest's, and which kind
// of spoofing that is; why is "" for a frame of its guest's.
func (p *Port) spoofed(frame []byte, fi frameInfo) (kind int, why string) {
	if !bytes.Equal(fi.src, p.MAC) && rules.On(rules.PortSource) {
		return spoofSourceMAC, fmt.Sprintf("source MAC %s on %s's port (%s)", fi.src, p.Name, p.MAC)
	}
	var bound netip.Addr
	if b := p.ip.Load(); b != nil {
		bound = *b
	}
	okIP := func(b []byte) (netip.Addr, bool) {
		a := netip.AddrFrom4([4]byte(b))
		return a, a.IsUnspecified() || !bound.IsValid() || a == bound || !rules.On(rules.PortSource)
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
		if why := p.badFragment(frame, fi); why != "" && rules.On(rules.DHCPSnooping) {
			return spoofFragment, why
		}
		// DHCP to the server: the client hardware address is the port's.
		// The message is whole (badFragment), so this is what the server
		// reads.
		if fi.proto == 17 && fi.dstPort == 67 && rules.On(rules.DHCPSnooping) {
			if len(frame) < fi.l4+8+34 {
				return spoofDHCPClient, fmt.Sprintf("a DHCP message from %s's port too short to name its client", p.Name)
			}
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
		if !allowedUpper6[fi.proto] && rules.On(rules.NDP) {
			// Behind an extension header the switch does not read (253,
			// 254: experiments; mobility; ESP over IPv6), a host stack may
			// still find neighbor discovery: only what a booting guest
			// sends passes, behind the headers the switch reads.
			return spoofNDP, fmt.Sprintf("IPv6 from %s's port with next header %d (only TCP, UDP and ICMPv6, behind hop-by-hop, routing and destination options)", p.Name, fi.proto)
		}
		if fi.fragment && rules.On(rules.NDP) {
			// Nothing a booting guest sends over IPv6 needs cutting up,
			// and a fragment hides its upper layer from these checks.
			return spoofFragment, fmt.Sprintf("a fragmented IPv6 datagram from %s's port", p.Name)
		}
		if fi.proto == 58 {
			return p.badICMPv6(frame, fi, bound6)
		}
	default:
		// The lab's network carries IPv4, ARP and IPv6. Anything else —
		// an 802.1Q tag above all, which would hide an IPv4 header from
		// the checks above — is not a guest's to send.
		return spoofEtherType, fmt.Sprintf("EtherType %#04x from %s's port (only IPv4, ARP and IPv6 are carried)", fi.etherType, p.Name)
	}
	return 0, ""
}

// badFragment says why an IPv4 fragment from the port could carry what the
// checks cannot see, "" if it cannot. The first fragment must show the
// whole transport header, and a DHCP message must come whole: then every
// datagram the host reassembles for the DHCP server began with a fragment
// the checks read, and later fragments cannot rewrite a header the
// first one showed (RFC 1858's overlapping fragments).
func (p *Port) badFragment(frame []byte, fi frameInfo) string {
	if !fi.fragment {
		return ""
	}
	header := map[uint8]int{6: 20, 17: 8}[fi.proto]
	switch {
	case fi.fragOff == 0 && fi.l4 > 0 && len(frame) < fi.l4+header:
		return fmt.Sprintf("an IPv4 first fragment from %s's port too short to show its transport header", p.Name)
	case fi.fragOff == 0 && fi.proto == 17 && fi.dstPort == 67:
		return fmt.Sprintf("a fragmented DHCP message from %s's port", p.Name)
	case fi.fragOff > 0 && fi.fragOff < header:
		return fmt.Sprintf("an IPv4 fragment from %s's port that overlaps the transport header", p.Name)
	}
	return ""
}

// badICMPv6 checks the neighbor discovery a port's guest sends: it may ask
// about anyone, but it answers only for its own addresses, and names only
// its own MAC as a link-layer address; router advertisements and redirects
// are the router's (the fabric's own responder), never a guest's.
func (p *Port) badICMPv6(frame []byte, fi frameInfo, bound6 netip.Addr) (int, string) {
	switch fi.icmpType {
	case 134, 137:
		if !rules.On(rules.RouterMessages) {
			return 0, ""
		}
		return spoofRouter, fmt.Sprintf("ICMPv6 type %d (a router's) from %s's port", fi.icmpType, p.Name)
	case 135, 136:
		if !rules.On(rules.NDP) {
			return 0, ""
		}
	default:
		return 0, ""
	}
	if len(frame) < fi.l4+24 {
		return spoofNDP, fmt.Sprintf("a neighbor discovery message from %s's port too short to read", p.Name)
	}
	if fi.icmpType == 136 {
		target, _ := netip.AddrFromSlice(frame[fi.l4+8 : fi.l4+24])
		if target != linkLocalOf(p.MAC) && (!bound6.IsValid() || target != bound6) {
			return spoofNDP, fmt.Sprintf("a neighbor advertisement from %s's port for %s, not its address", p.Name, target)
		}
	}
	for opts := frame[fi.l4+24:]; len(opts) >= 2; {
		n := int(opts[1]) * 8
		if n == 0 || n > len(opts) {
			return spoofNDP, fmt.Sprintf("a neighbor discovery message from %s's port with a malformed option", p.Name)
		}
		if (opts[0] == 1 || opts[0] == 2) && (n < 8 || !bytes.Equal(opts[2:8], p.MAC)) {
			return spoofNDP, fmt.Sprintf("a neighbor discovery message from %s's port naming link-layer address %s", p.Name, net.HardwareAddr(opts[2:min(8, n)]))
		}
		opts = opts[n:]
	}
	return 0, ""
}

// allowedUpper6 are the upper layers a guest's IPv6 may carry (59: no next
// header).
var allowedUpper6 = map[uint8]bool{6: true, 17: true, 58: true, 59: true}

// linkLocalOf is the EUI-64 link-local address of mac.
func linkLocalOf(mac net.HardwareAddr) netip.Addr {
	if len(mac) != 6 {
		return netip.Addr{}
	}
	return netip.AddrFrom16([16]byte{0: 0xfe, 1: 0x80, 8: mac[0] ^ 2, 9: mac[1], 10: mac[2], 11: 0xff, 12: 0xfe, 13: mac[3], 14: mac[4], 15: mac[5]})
}

// CheckGuestMAC says why mac cannot be a guest's port: a group (multicast
// or broadcast) address, all zeros, or the host's own.
func CheckGuestMAC(mac, host net.HardwareAddr) error {
	switch {
	case len(mac) != 6:
		return fmt.Errorf("MAC %s: not an Ethernet address", mac)
	case isGroup(mac):
		return fmt.Errorf("MAC %s is a group (multicast or broadcast) address", mac)
	case bytes.Equal(mac, make([]byte, 6)):
		return fmt.Errorf("MAC %s is all zeros", mac)
	case bytes.Equal(mac, host):
		return fmt.Errorf("MAC %s is the boot server's", mac)
	}
	return nil
}

// refuse records a spoofed frame: the first of each kind on a port, then
// every power of two, so a flood does not flood the timeline.
func (p *Port) refuse(kind int, why string) {
	if n := p.spoofs[kind].Add(1); n&(n-1) == 0 {
		p.f.tl.Emit(timeline.Event{Source: "netfab", Kind: "spoofed", Guest: p.Name, MAC: p.MAC.String(),
			Msg: fmt.Sprintf("%s: dropped (%d so far)", why, n), Detail: map[string]any{"count": n}})
	}
}
