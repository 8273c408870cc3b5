package ipsec

import (
	"fmt"
	"strings"
	"sync"
)

// Action is what the policy does with a packet.
type Action int

const (
	Bypass  Action = iota // pass in clear
	Protect               // only under ESP: clear traffic is dropped
	Discard               // drop
)

func (a Action) String() string {
	return [...]string{"bypass", "protect", "discard"}[a]
}

// IP protocol numbers the rules name.
const (
	ProtoICMP = 1
	ProtoTCP  = 6
	ProtoUDP  = 17
)

// Rule selects traffic by protocol (0: any) and the host's port (0: any):
// the destination port of what a guest sends to the host, the source port
// of what the host sends back, so one rule covers both directions of a
// service, and a guest cannot pass a rule by choosing its own source port.
type Rule struct {
	Proto  uint8
	Port   uint16
	Action Action
}

// ProtoName names an IP protocol as rules and reports spell it: "any" (0),
// icmp, tcp, udp, else its number.
func ProtoName(proto uint8) string {
	if name, ok := map[uint8]string{0: "any", ProtoICMP: "icmp", ProtoTCP: "tcp", ProtoUDP: "udp"}[proto]; ok {
		return name
	}
	return fmt.Sprint(proto)
}

func (r Rule) String() string {
	proto := ProtoName(r.Proto)
	port := "*"
	if r.Port != 0 {
		port = fmt.Sprint(r.Port)
	}
	return fmt.Sprintf("%s/%s %s", proto, port, r.Action)
}

func (r Rule) matches(proto uint8, hostPort uint16) bool {
	if r.Proto != 0 && r.Proto != proto {
		return false
	}
	return r.Port == 0 || r.Port == hostPort
}

// Policy is an ordered security policy table: the first matching rule
// decides; no match is Default.
type Policy struct {
	Rules   []Rule
	Default Action

	mu   sync.Mutex
	hits []PolicyCounters // per rule, then the default
}

// PolicyCounters are what one rule decided.
type PolicyCounters struct {
	Rule    string
	Packets uint64
	Dropped uint64 // discarded, or clear traffic a protect rule refused
}

// Required is the policy of an IPsec-required lab network: the root's
// services (portmapper, NFS, iSCSI) only under ESP; what boot loaders need
// before any ESP exists (DHCP, TFTP with its transfer ports, the boot-file
// HTTP server, ICMP) in clear; anything else dropped.
func Required() *Policy {
	return &Policy{Rules: []Rule{
		{ProtoTCP, 111, Protect},
		{ProtoUDP, 111, Protect},
		{ProtoTCP, 2049, Protect},
		{ProtoTCP, 3260, Protect},
		{ProtoUDP, 67, Bypass},
		{ProtoUDP, 68, Bypass},
		{ProtoUDP, 0, Bypass}, // TFTP: port 69, then the server's ephemeral transfer ports
		{ProtoTCP, 80, Bypass},
		{ProtoICMP, 0, Bypass},
	}, Default: Discard}
}

// Decide returns the action for a packet (by protocol and the host's port:
// the destination port of a packet to the host, the source port of one
// from it) and the index of the rule that decided, and counts it. The
// caller reports drops with Dropped: clear traffic a protect rule refuses,
// or a discard.
func (p *Policy) Decide(proto uint8, hostPort uint16) (Action, int) {
	i := len(p.Rules)
	a := p.Default
	for j, r := range p.Rules {
		if r.matches(proto, hostPort) {
			i, a = j, r.Action
			break
		}
	}
	p.count(i, func(c *PolicyCounters) { c.Packets++ })
	return a, i
}

// Dropped counts a drop by rule i (as Decide returned it).
func (p *Policy) Dropped(i int) { p.count(i, func(c *PolicyCounters) { c.Dropped++ }) }

func (p *Policy) count(i int, f func(*PolicyCounters)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.hits == nil {
		p.hits = make([]PolicyCounters, len(p.Rules)+1)
		for j, r := range p.Rules {
			p.hits[j].Rule = r.String()
		}
		p.hits[len(p.Rules)].Rule = "default " + p.Default.String()
	}
	f(&p.hits[i])
}

// Counters returns a snapshot of the per-rule counters (the default last).
func (p *Policy) Counters() []PolicyCounters {
	p.count(0, func(*PolicyCounters) {}) // make sure they exist
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]PolicyCounters(nil), p.hits...)
}

func (p *Policy) String() string {
	var parts []string
	for _, r := range p.Rules {
		parts = append(parts, r.String())
	}
	return strings.Join(parts, ", ") + ", default " + p.Default.String()
}
