package harness

import (
	"context"
	"sync"
	"time"

	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/judge"
)

// boot is one boot of a guest: from QEMU's start (or a reset) to its
// verdict, and on until the next reset. Its events carry its number on the
// timeline; its judge (stages, deadlines, verdict) and its drift check are
// its own, so a second boot is never judged by what the first one did.
type boot struct {
	id int
	j  *judge.Boot

	// ctx is the boot's lifetime: it ends with the next boot or when the
	// guest closes (end), and with it work done for the boot (the judge's
	// watch, the drift check, a stalled transfer's wait).
	ctx context.Context
	end context.CancelFunc

	// The server's comparison of the served archive with the NFS root
	// (checkDrift): started at the root's mount, done when driftDone
	// closes. Guarded by the guest's mu.
	driftOnce    sync.Once
	driftStarted bool
	driftDone    chan struct{}
	drift        string // what a stale-archive event said
	driftWarn    string // why the comparison could not tell
}

// newBoot starts the guest's next boot at start (zero: when QEMU starts):
// a new number on the timeline, a new judge and fresh state. The previous
// boot, if any, keeps its verdict.
func (g *Guest) newBoot(start time.Time) *boot {
	b := &boot{id: g.lab.tl.NewBoot(g.Name), driftDone: make(chan struct{})}
	b.j = judge.New(g.lab.tl, g.Name, b.id, g.rules(b))
	if !start.IsZero() {
		b.j.Begin(start)
	}
	b.ctx, b.end = context.WithCancel(g.lab.ctx)
	g.mu.Lock()
	old := g.cur
	g.mu.Unlock()
	if old != nil && !old.j.Start().IsZero() {
		// Reset before its verdict: the boot ended there.
		old.j.Decide(judge.Verdict{Reason: failure.Interrupted, Stage: old.j.Reached(), Detail: "the machine was reset before this boot's verdict"})
	}
	g.mu.Lock()
	g.cur = b
	g.mu.Unlock()
	if old != nil {
		old.stopDrift() // ends its ctx: its watch and its work
	}
	return b
}

// rules are what the guest's boot b is judged by: its spec's expectations
// and deadlines, and the drift check of b.
func (g *Guest) rules(b *boot) judge.Rules {
	return judge.Rules{
		Expect: g.expect, Steps: g.steps, FailOn: g.failOn, Passes: g.passes,
		StageTimeouts: g.spec.StageTimeouts, StallWindow: g.spec.StallWindow, OnStage: g.spec.OnStage,
		Drift:   func(wait bool) (string, string) { return b.driftFound(g, wait) },
		Machine: g.machineState,
	}
}

// machineState samples what the guest's QEMU was doing for a second: a
// verdict of standing still then says whether the guest hung or the
// emulator was not running it.
func (g *Guest) machineState(ctx context.Context) string {
	g.mu.Lock()
	proc := g.proc
	g.mu.Unlock()
	if proc == nil {
		return ""
	}
	return proc.Sample(ctx, time.Second).String()
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
		return b.j.Start()
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
