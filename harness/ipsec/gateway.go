package ipsec

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
)

// Gateway is ESP on the lab's host stack: it sees every IPv4 packet between
// the guests and the host, opens ESP from guests, protects what the policy
// says must be protected towards them, and drops clear traffic the policy
// requires ESP for. Each guest is a peer with one SA per direction.
type Gateway struct {
	Policy *Policy
	// Report, if set, hears what the gateway refused (kind: esp-auth,
	// esp-replay, esp-unknown-spi, esp-malformed, esp-required — clear
	// traffic a protect rule refused —, policy-drop, no-sa), the guest's
	// address, how many times so far, and a message. Repeats are reported
	// on the first occurrence and then every power of two.
	Report func(kind string, addr netip.Addr, n uint64, msg string)
	// MSS, if set, is the largest TCP segment protected connections may
	// carry: the SYNs the gateway opens or protects are clamped to it
	// (see ClampMSS and MaxMSS).
	MSS uint16

	mu      sync.Mutex
	peers   map[netip.Addr]*Peer
	bySPI   map[uint32]*Peer
	reports map[string]uint64
}

// Peer is one guest's pair of SAs.
type Peer struct {
	Addr netip.Addr
	In   *SA // guest -> host
	Out  *SA // host -> guest
}

// NewGateway returns a gateway enforcing p.
func NewGateway(p *Policy) *Gateway {
	return &Gateway{Policy: p, peers: map[netip.Addr]*Peer{}, bySPI: map[uint32]*Peer{}, reports: map[string]uint64{}}
}

// AddPeer installs a guest's SAs (replacing earlier ones for its address).
func (g *Gateway) AddPeer(p *Peer) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if old := g.peers[p.Addr]; old != nil && old.In != nil {
		delete(g.bySPI, old.In.SPI)
	}
	g.peers[p.Addr] = p
	if p.In != nil {
		g.bySPI[p.In.SPI] = p
	}
}

// RemovePeer uninstalls p's SAs, if they are still the ones for its
// address.
func (g *Gateway) RemovePeer(p *Peer) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.peers[p.Addr] != p {
		return
	}
	delete(g.peers, p.Addr)
	if p.In != nil && g.bySPI[p.In.SPI] == p {
		delete(g.bySPI, p.In.SPI)
	}
}

// Peer returns the guest's SAs, if any.
func (g *Gateway) Peer(addr netip.Addr) *Peer {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.peers[addr]
}

func (g *Gateway) report(kind string, addr netip.Addr, format string, args ...any) {
	g.mu.Lock()
	key := kind + " " + addr.String()
	g.reports[key]++
	n := g.reports[key]
	g.mu.Unlock()
	if g.Report != nil && n&(n-1) == 0 {
		msg := fmt.Sprintf(format, args...)
		if n > 1 {
			msg += fmt.Sprintf(" (%d times)", n)
		}
		g.Report(kind, addr, n, msg)
	}
}

func srcOf(pkt []byte) netip.Addr { return netip.AddrFrom4([4]byte(pkt[12:16])) }
func dstOf(pkt []byte) netip.Addr { return netip.AddrFrom4([4]byte(pkt[16:20])) }

// Inbound takes an IPv4 packet a guest sent to the host and returns what the
// host stack should get: the opened packet, the packet itself, or nil.
func (g *Gateway) Inbound(pkt []byte) []byte {
	proto, sport, dport, err := Ports(pkt)
	if err != nil {
		// What the gateway cannot read, it cannot judge: it goes no
		// further than a policy that discards it would let it.
		if len(pkt) >= 20 {
			g.report("malformed", srcOf(pkt), "a packet the gateway cannot read was dropped: %v", err)
		}
		return nil
	}
	from := srcOf(pkt)
	if _, err := ipv4(pkt); errors.Is(err, ErrFragment) && proto != ProtoESP {
		// A fragment carries no ports (or only the first does): it could
		// pass a rule meant for another port. The lab's path MTU makes
		// whole datagrams, so a fragment is dropped.
		g.report("fragment", from, "IP fragment (%s) dropped: the policy needs the ports", ProtoName(proto))
		return nil
	}
	if proto == ProtoESP {
		if _, err := ipv4(pkt); errors.Is(err, ErrFragment) {
			g.report("esp-malformed", from, "ESP fragment dropped (transport-mode ESP needs whole datagrams)")
			return nil
		}
		ihl := int(pkt[0]&0x0f) * 4
		spi, err := SPIOf(pkt[ihl:])
		g.mu.Lock()
		peer := g.bySPI[spi]
		g.mu.Unlock()
		if err != nil || peer == nil || peer.Addr != from {
			g.report("esp-unknown-spi", from, "ESP with SPI %#x from %s matches no SA", spi, from)
			return nil
		}
		inner, err := Decap(peer.In, pkt)
		switch {
		case errors.Is(err, ErrAuth):
			g.report("esp-auth", from, "ESP authentication failed on SA %#x (wrong key?)", spi)
			return nil
		case errors.Is(err, ErrReplay):
			g.report("esp-replay", from, "ESP replay dropped on SA %#x: %v", spi, err)
			return nil
		case err != nil:
			g.report("esp-malformed", from, "ESP on SA %#x: %v", spi, err)
			return nil
		}
		iproto, isport, idport, _ := Ports(inner)
		if a, i := g.Policy.Decide(iproto, idport); a == Discard {
			g.Policy.Dropped(i)
			g.report("policy-drop", from, "%s under ESP from %s: the policy discards it", describe(iproto, isport, idport), from)
			return nil
		}
		if g.MSS != 0 {
			ClampMSS(inner, g.MSS)
		}
		return inner
	}
	a, i := g.Policy.Decide(proto, dport)
	switch a {
	case Protect:
		g.Policy.Dropped(i)
		g.report("esp-required", from, "clear %s from %s dropped: the policy requires ESP", describe(proto, sport, dport), from)
		return nil
	case Discard:
		g.Policy.Dropped(i)
		g.report("policy-drop", from, "%s from %s: the policy discards it", describe(proto, sport, dport), from)
		return nil
	}
	return pkt
}

// Outbound takes an IPv4 packet the host stack sends to a guest and returns
// what goes on the wire: the packet, its ESP-protected form, or nil.
func (g *Gateway) Outbound(pkt []byte) []byte {
	proto, sport, dport, err := Ports(pkt)
	if err != nil {
		return pkt
	}
	to := dstOf(pkt)
	a, i := g.Policy.Decide(proto, sport)
	switch a {
	case Bypass:
		return pkt
	case Discard:
		g.Policy.Dropped(i)
		g.report("policy-drop", to, "%s to %s: the policy discards it", describe(proto, sport, dport), to)
		return nil
	}
	peer := g.Peer(to)
	if peer == nil || peer.Out == nil {
		g.Policy.Dropped(i)
		g.report("no-sa", to, "%s to %s needs ESP and the guest has no SA", describe(proto, sport, dport), to)
		return nil
	}
	if g.MSS != 0 {
		ClampMSS(pkt, g.MSS) // the filter's own copy: changed in place
	}
	esp, err := Encap(peer.Out, pkt)
	if err != nil {
		g.report("esp-malformed", to, "cannot protect %s to %s: %v", describe(proto, sport, dport), to, err)
		return nil
	}
	return esp
}

func describe(proto uint8, sport, dport uint16) string {
	switch proto {
	case ProtoTCP, ProtoUDP:
		return fmt.Sprintf("%s %d->%d", ProtoName(proto), sport, dport)
	case ProtoICMP:
		return ProtoName(proto)
	}
	return fmt.Sprintf("protocol %d", proto)
}
