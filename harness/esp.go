package harness

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"net/netip"
	"strings"

	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/timeline"
)

// ESPConfPath is where the reference archive carries a guest's ESP keys
// (marked secret in its manifest; the init reads it, nothing prints it).
const ESPConfPath = "/etc/nbh/esp.conf"

// startIPsec puts the lab's ESP gateway between the guests and the host
// stack: traffic the policy protects passes only under ESP, with each
// guest's own SAs; the rest passes in clear or is dropped as it says.
func (l *Lab) startIPsec(p *ipsec.Policy, keyBits int) error {
	switch keyBits {
	case 0:
		keyBits = 128
	case 128, 256:
	default:
		return fmt.Errorf("lab: ESP key size %d: want 128 or 256", keyBits)
	}
	l.espBits = keyBits
	gw := ipsec.NewGateway(p)
	gw.MSS = ipsec.MaxMSS(l.fabric.MTU())
	gw.Report = l.espReport
	l.esp = gw
	l.fabric.SetHostFilter(func(toHost bool, ip []byte) []byte {
		if toHost {
			return gw.Inbound(ip)
		}
		return gw.Outbound(ip)
	})
	l.tl.Emit(timeline.Event{Source: "ipsec", Kind: "policy", Msg: p.String(),
		Detail: map[string]any{"mss": int(gw.MSS), "mtu": l.fabric.MTU(), "key-bits": keyBits}})
	return nil
}

// ESP is the lab's ESP gateway (nil when the network is clear), for its
// counters.
func (l *Lab) ESP() *ipsec.Gateway { return l.esp }

// espKeys makes the guest's two SAs (guest to host, host to guest) with
// fresh random SPIs and keys, installs them in the gateway, and returns the
// configuration its archive carries — nil with the ipsec-no-keys fault, a
// wrong key or SPI with the others.
func (g *Guest) espKeys() ([]byte, error) {
	klen := g.lab.espBits/8 + 4 // key and RFC 4106 salt
	keys := make([]byte, 2*klen)
	io.ReadFull(g.rand, keys)
	inSPI, outSPI := randomSPI(g.rand), randomSPI(g.rand)
	saIn, err := ipsec.NewSA(inSPI, keys[:klen])
	if err != nil {
		return nil, err
	}
	saOut, err := ipsec.NewSA(outSPI, keys[klen:])
	if err != nil {
		return nil, err
	}
	addr, err := netip.ParseAddr(g.IP)
	if err != nil {
		return nil, err
	}
	g.espAddr = addr
	g.espPeer = &ipsec.Peer{Addr: addr, In: saIn, Out: saOut}
	g.lab.esp.AddPeer(g.espPeer)
	if g.plan.espNoKeys {
		return nil, nil
	}
	// The guest's view: it sends on the gateway's inbound SA.
	sendSPI, recvSPI := inSPI, outSPI
	sendKey := append([]byte(nil), keys[:klen]...)
	recvKey := append([]byte(nil), keys[klen:]...)
	if g.plan.espWrongKey {
		sendKey[0] ^= 0x80
		recvKey[0] ^= 0x80
	}
	if g.plan.espWrongSPI {
		sendSPI, recvSPI = randomSPI(g.rand), randomSPI(g.rand)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# ESP keys of guest %s: secret, never print this file.\n", g.Name)
	fmt.Fprintf(&b, "server %s\n", g.lab.Server())
	fmt.Fprintf(&b, "out %#08x %s\n", sendSPI, hex.EncodeToString(sendKey))
	fmt.Fprintf(&b, "in %#08x %s\n", recvSPI, hex.EncodeToString(recvKey))
	for _, r := range g.lab.esp.Policy.Rules {
		if r.Action != ipsec.Protect {
			continue
		}
		fmt.Fprintf(&b, "protect %s %d\n", ipsec.ProtoName(r.Proto), r.Port)
	}
	return []byte(b.String()), nil
}

// randomSPI is a random SPI outside the reserved 0..255.
func randomSPI(r io.Reader) uint32 {
	var b [4]byte
	for {
		io.ReadFull(r, b[:])
		if v := binary.BigEndian.Uint32(b[:]); v > 255 {
			return v
		}
	}
}

// espReport hears the gateway: each refusal goes on the timeline, and the
// ones that mean a guest can never reach its root decide its boot.
func (l *Lab) espReport(kind string, addr netip.Addr, n uint64, msg string) {
	var g *Guest
	l.mu.Lock()
	for _, c := range l.guests {
		if c.espAddr == addr && (g == nil || c.n > g.n) { // the latest guest of the address
			g = c
		}
	}
	l.mu.Unlock()
	e := timeline.Event{Source: "ipsec", Kind: kind, Addr: addr.String(), Msg: msg, Detail: map[string]any{"count": n}}
	if g != nil {
		e.Guest = g.Name
	}
	l.tl.Emit(e)
	if g != nil {
		g.espFailure(kind, n, msg)
	}
}

// espFailure decides the boot when the gateway's evidence says it cannot
// succeed: clear traffic to a protected service (nothing set up ESP for it:
// a boot loader, or an init without keys), or ESP that keeps failing to
// open on an SA that never opened a packet (wrong key, wrong SPI). A single
// bad packet on a working SA (a corrupted frame) decides nothing.
func (g *Guest) espFailure(kind string, n uint64, msg string) {
	// Past the loader, only the root's traffic is protected: whatever the
	// console said last (an iSCSI login comes before "mounting root"), it
	// is the root that cannot be reached.
	st := g.Reached()
	if st > timeline.Loader {
		st = max(st, timeline.Root)
	}
	v := Verdict{Stage: st, Detail: msg}
	switch kind {
	case "esp-required":
		if st <= timeline.Loader {
			v.Reason = failure.LoaderNoIPsec
			v.Detail += "; the network requires ESP for this service, and a boot loader has no ESP: only the kernel, once the archive's init has set up its SAs, can reach the root"
		} else {
			v.Reason = failure.ESPRequired
			v.Detail += "; nothing in the guest set up ESP (no keys in the archive?)"
		}
	case "esp-auth", "esp-unknown-spi":
		peer := g.lab.esp.Peer(g.espAddr)
		if n < 2 || peer == nil || peer.In.Counters().Packets > 0 {
			return
		}
		v.Reason = failure.ESPAuth
		if kind == "esp-unknown-spi" {
			v.Reason = failure.ESPNoSA
		}
	default:
		return
	}
	v.Detail += "; " + g.espCounters()
	g.decide(v)
}

// espCounters is the guest's SA counters, for the timeline and verdicts.
func (g *Guest) espCounters() string {
	if g.lab.esp == nil {
		return ""
	}
	p := g.lab.esp.Peer(g.espAddr)
	if p == nil {
		return "no SAs"
	}
	c := func(sa *ipsec.SA, what string) string {
		k := sa.Counters()
		return fmt.Sprintf("SA %#08x (%s): %d packets, %d bytes, %d authentication failures, %d replays, %d malformed",
			sa.SPI, what, k.Packets, k.Bytes, k.AuthFailures, k.Replays, k.Malformed)
	}
	return c(p.In, "guest to lab") + "; " + c(p.Out, "lab to guest")
}

// espSummary puts the guest's SA counters and the policy's on the timeline.
func (g *Guest) espSummary() {
	gw := g.lab.esp
	if gw == nil || !g.espAddr.IsValid() {
		return
	}
	detail := map[string]any{}
	if p := gw.Peer(g.espAddr); p != nil {
		detail["in"], detail["out"] = p.In.Counters(), p.Out.Counters()
	}
	var rules []string
	for _, r := range gw.Policy.Counters() {
		rules = append(rules, fmt.Sprintf("%s: %d packets, %d dropped", r.Rule, r.Packets, r.Dropped))
	}
	detail["policy"] = rules
	g.lab.tl.Emit(timeline.Event{Source: "ipsec", Kind: "counters", Guest: g.Name, Msg: g.espCounters(), Detail: detail})
}
