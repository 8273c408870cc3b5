package netfab

import (
	"fmt"
	"math/rand"
	"strings"
	"sync"
	"time"
)

// Dir is the direction a frame crosses a guest port.
type Dir int

const (
	Both      Dir = iota
	ToGuest       // from the fabric to the guest
	FromGuest     // from the guest to the fabric
)

func (d Dir) String() string { return [...]string{"both", "to-guest", "from-guest"}[d] }

// Action is what a rule does to a frame it matches.
type Action int

const (
	Drop Action = iota
	Delay
	Corrupt // flip one byte of the transport payload (or of the frame's tail)
	Replay  // pass the frame, and send a copy of it again Delay later
	Limit   // pass frames no faster than Rate bytes a second (a slow link), queueing at most LimitQueue
)

func (a Action) String() string { return [...]string{"drop", "delay", "corrupt", "replay", "limit"}[a] }

// Rule is a packet fault: frames crossing a guest port in Dir that match
// Proto and Port are dropped, delayed or corrupted. Nth > 0 limits the rule to
// the nth matching frame (1-based); otherwise every match fires.
type Rule struct {
	Name   string
	Guest  string // port name; empty means every guest
	Dir    Dir
	Proto  string // "tcp", "udp", "esp" or "" for any IP protocol
	Port   int    // source or destination port; 0 for any
	Nth    int
	Action Action
	Delay  time.Duration
	Rate   int64 // Limit's bytes a second
}

func (r Rule) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s", r.Action, r.Dir)
	if r.Proto != "" {
		fmt.Fprintf(&b, " %s", r.Proto)
	}
	if r.Port != 0 {
		fmt.Fprintf(&b, " port %d", r.Port)
	}
	if r.Nth > 0 {
		fmt.Fprintf(&b, " packet #%d", r.Nth)
	}
	if r.Action == Delay || r.Action == Replay {
		fmt.Fprintf(&b, " by %s", r.Delay)
	}
	if r.Action == Limit {
		fmt.Fprintf(&b, " to %d bytes/s", r.Rate)
	}
	return b.String()
}

type ruleState struct {
	Rule
	mu      sync.Mutex
	matched int
	fired   int
	next    time.Time // Limit: when the link is free for the next frame
}

// LimitQueue is how long a frame may wait for a Limit rule's link: a slow
// link's router holds a short queue and drops what does not fit (tail
// drop). An endless queue would hold a TFTP client's retransmissions and
// the server's repeated windows until every packet came too late.
const LimitQueue = 250 * time.Millisecond

// pace is how long a frame of n bytes waits on a Limit rule's link: the
// frames before it leave first, each taking n/Rate of the link's time. It
// is false for a frame the queue has no room for.
func (r *ruleState) pace(now time.Time, n int) (time.Duration, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.next.Before(now) {
		r.next = now
	}
	wait := r.next.Sub(now)
	if wait > LimitQueue {
		return 0, false
	}
	r.next = r.next.Add(time.Duration(int64(n) * int64(time.Second) / max(r.Rate, 1)))
	return wait, true
}

// match reports whether the rule fires on this frame and counts it.
func (r *ruleState) match(port string, dir Dir, fi frameInfo) (fire bool, count int) {
	if r.Guest != "" && r.Guest != port {
		return false, 0
	}
	if r.Dir != Both && r.Dir != dir {
		return false, 0
	}
	if fi.etherType != 0x0800 && fi.etherType != 0x86dd && (r.Proto != "" || r.Port != 0) {
		return false, 0
	}
	switch r.Proto {
	case "tcp":
		if fi.proto != 6 {
			return false, 0
		}
	case "udp":
		if fi.proto != 17 {
			return false, 0
		}
	case "esp":
		if fi.proto != 50 {
			return false, 0
		}
	}
	if r.Port != 0 && int(fi.srcPort) != r.Port && int(fi.dstPort) != r.Port {
		return false, 0
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.matched++
	if r.Nth > 0 && r.matched != r.Nth {
		return false, 0
	}
	r.fired++
	return true, r.fired
}

// corrupt flips a byte past the headers, so the frame still reaches its
// receiver and only an integrity check can notice.
func corrupt(frame []byte, fi frameInfo) []byte {
	out := append([]byte(nil), frame...)
	if len(out) == 0 {
		return out
	}
	start := fi.l4 + 8
	if fi.proto == 6 {
		start = fi.l4 + 20
	}
	if start >= len(out) {
		start = len(out) - 1
	}
	i := start + rand.Intn(len(out)-start)
	out[i] ^= 0xff
	return out
}
