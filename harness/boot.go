package harness

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/timeline"
)

// boot is one boot of a guest: from QEMU's start (or a reset) to its
// verdict, and on until the next reset. Its events carry its number on the
// timeline; its stages, deadlines, verdict and drift check are its own, so
// a second boot is never judged by what the first one did.
type boot struct {
	id    int
	start time.Time

	// Guarded by the guest's mu.
	reached   timeline.Stage
	since     time.Time // when reached was reached, or the last progress
	stepsSeen int       // how many of Spec.Steps the console has shown, in order
	waiting   *waiting  // what the boot waits for, if a console line said so
	verdict   *Verdict
	progress  progress // the last bytes moved for the boot

	decided chan struct{}

	// dhcpIgnored counts the DHCP messages the no-dhcp fault ignored.
	dhcpIgnored atomic.Int32

	// ctx is the boot's lifetime: it ends with the next boot or when the
	// guest closes (end), and with it work done for the boot (the drift
	// check, a stalled transfer's wait).
	ctx context.Context
	end context.CancelFunc

	// The server's comparison of the served archive with the NFS root
	// (checkDrift): started at the root's mount, done when driftDone
	// closes.
	driftOnce    sync.Once
	driftStarted bool
	driftDone    chan struct{}
	drift        string // what a stale-archive event said
	driftWarn    string // why the comparison could not tell
}

// progress is the last transfer that moved bytes for a boot.
type progress struct {
	at     time.Time
	source string // tftp, http, nfs, iscsi
	what   string // the file, export or LUN
	bytes  int64  // how far it got
	of     int64  // its size, when known
	open   bool   // a file transfer not finished yet (stall-watched)
}

func (p progress) ofSize() string {
	if p.of > 0 {
		return fmt.Sprintf(" of %d", p.of)
	}
	return ""
}

// noteProgress follows the bytes services move for boot b (their
// "progress" events, timeline.Meter): moving bytes are progress against the
// stage's deadline, and a file transfer is watched for a stall until the
// service reports how it ended.
func (g *Guest) noteProgress(b *boot, e timeline.Event) {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch {
	case e.Kind == timeline.ProgressKind:
		n, _ := e.Detail["bytes"].(int64)
		of, _ := e.Detail["of"].(int64)
		open, _ := e.Detail["open"].(bool)
		b.progress = progress{at: e.Time, source: e.Source, what: e.Msg, bytes: n, of: of, open: open}
		if e.Time.After(b.since) {
			b.since = e.Time
		}
	case b.progress.open && e.Source == b.progress.source && transferEnds[e.Kind] &&
		(e.Msg == b.progress.what || strings.HasPrefix(e.Msg, b.progress.what+" ")):
		// The end of the transfer watched (its events name its file
		// first), not of another.
		b.progress.open = false
	}
}

// transferEnds are the kinds of a service's event that end a transfer.
var transferEnds = map[string]bool{"transfer": true, "aborted": true, "error": true, "not-found": true, "refused": true}

// newBoot starts the guest's next boot at start: a new number on the
// timeline and fresh state. The previous boot, if any, keeps its verdict.
func (g *Guest) newBoot(start time.Time) *boot {
	b := &boot{id: g.lab.tl.NewBoot(g.Name), start: start, decided: make(chan struct{}), driftDone: make(chan struct{})}
	b.ctx, b.end = context.WithCancel(g.lab.ctx)
	g.mu.Lock()
	old := g.cur
	g.mu.Unlock()
	if old != nil && !old.start.IsZero() {
		// Reset before its verdict: the boot ended there.
		g.decideBoot(old, Verdict{Reason: failure.Interrupted, Stage: g.Reached(), Detail: "the machine was reset before this boot's verdict"})
	}
	g.mu.Lock()
	g.cur = b
	g.mu.Unlock()
	if old != nil {
		old.stopDrift() // ends its ctx: its watch and its work
	}
	return b
}

// current is the guest's boot now.
func (g *Guest) current() *boot {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.cur
}

// Boot is the number of the guest's current boot: 1 for the first, one
// more after each Reboot or Reset (and for a guest booted again under its
// name). Events, Spans and Verdict are the current boot's.
func (g *Guest) Boot() int {
	if b := g.current(); b != nil {
		return b.id
	}
	return 0
}

// BootStart is when the current boot began (QEMU's start or its reset).
func (g *Guest) BootStart() time.Time {
	if b := g.current(); b != nil {
		return b.start
	}
	return time.Time{}
}

// stopDrift ends a comparison under way and waits for it, or makes sure
// none starts (a new boot, Close: before the root it reads is released).
func (b *boot) stopDrift() {
	b.end()
	b.driftOnce.Do(func() { close(b.driftDone) })
	<-b.driftDone
}
