package harness

import (
	"context"
	"fmt"
	"time"

	"nbh.dev/nbh/harness/console"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/judge"
	"nbh.dev/nbh/harness/timeline"
)

// Verdict is how a boot ended (judge.Verdict).
type Verdict = judge.Verdict

// BootError is a failed boot as an error (judge.BootError).
type BootError = judge.BootError

// DefaultStageTimeouts are the per-stage deadlines
// (judge.DefaultStageTimeouts).
func DefaultStageTimeouts() map[timeline.Stage]time.Duration { return judge.DefaultStageTimeouts() }

// DefaultStallWindow is how long a file transfer may stand still before the
// boot ends as stalled (judge.DefaultStallWindow).
const DefaultStallWindow = judge.DefaultStallWindow

// observe hands the guest's events on the lab timeline to its current
// boot's judge, and starts the boot's drift check when its NFS root is
// mounted.
func (g *Guest) observe(e timeline.Event) {
	b := g.current()
	if e.Guest != g.Name || b == nil || e.Boot != b.id || g.closed() {
		return
	}
	if e.Source == "nfs" && e.Kind == "mount" && g.spec.Root == RootNFS {
		g.mu.Lock()
		first := !b.driftStarted && !g.isClosed
		b.driftStarted = true
		g.mu.Unlock()
		if first {
			go g.checkDrift(b)
		}
	}
	b.j.Observe(e)
}

// Reached is the furthest stage of the current boot so far.
func (g *Guest) Reached() timeline.Stage {
	if b := g.current(); b != nil {
		return b.j.Reached()
	}
	return timeline.None
}

// monitor reads console lines: the conversation hears each, the console's
// prompts are answered, and the current boot's judge judges it. When the
// console ends (QEMU exited), the boot under way ends with it.
func (g *Guest) monitor() {
	tl := g.lab.tl
	for line := range g.con.Lines() {
		if !line.Replayed {
			// A restored machine's output from before its save is not
			// said now: no conversation and no responder answers it.
			g.hear(line)
		}
		b := g.current()
		if line.Time.Before(b.j.Start()) {
			continue // the end of the boot before a reset
		}
		if r, ok := console.Respond(line.Text); ok && !g.spec.KeepPrompts && !line.Replayed {
			if err := g.con.Send(r.Send); err == nil {
				tl.Emit(timeline.Event{Source: "console", Kind: "responded", Guest: g.Name, Time: line.Time, Msg: r.Why})
			}
		}
		b.j.Line(line)
	}
	g.hearEnd()
	err := g.proc.ExitError()
	tl.Emit(timeline.Event{Source: "qemu", Kind: "exit", Guest: g.Name, Msg: fmt.Sprint(err)})
	if stderr := g.proc.Stderr(); err != nil && stderr != "" {
		g.decide(Verdict{Reason: failure.QEMUFailed, Stage: g.Reached(), Detail: stderr})
		return
	}
	g.decide(Verdict{Reason: failure.GuestStopped, Stage: g.Reached()})
}

// decide settles the current boot with v, unless it is settled.
func (g *Guest) decide(v Verdict) { g.current().j.Decide(v) }

// Wait returns the current boot's verdict: the first of the marker, a
// classified failure, QEMU's exit, the spec's deadline or ctx's end. Past
// the deadline it takes at most a few seconds more, to say what the
// machine was doing (Process.Sample). On a guest that never started it
// returns a Setup verdict.
func (g *Guest) Wait(ctx context.Context) Verdict {
	b := g.current()
	if b == nil || g.proc == nil {
		return Verdict{Reason: failure.Setup, Detail: "the guest was never started (Lab.Boot starts it; Provision only prepares it)"}
	}
	deadline := time.NewTimer(time.Until(b.j.Start().Add(g.spec.Timeout)))
	defer deadline.Stop()
	select {
	case <-b.j.Decided():
	case <-deadline.C:
		detail := fmt.Sprintf("no marker and no classified failure within %s", g.spec.Timeout)
		if !b.j.IsDecided() {
			if m := g.machineState(ctx); m != "" {
				detail += "; " + m
			}
		}
		if ctx.Err() != nil {
			b.j.Decide(Verdict{Reason: failure.Interrupted, Stage: b.j.Reached(), Detail: ctx.Err().Error()})
			break
		}
		b.j.Decide(Verdict{Reason: failure.Deadline, Stage: b.j.Reached(), Detail: detail})
	case <-ctx.Done():
		b.j.Decide(Verdict{Reason: failure.Interrupted, Stage: b.j.Reached(), Detail: ctx.Err().Error()})
	}
	v, _ := b.j.Verdict()
	if v.OK && !g.spec.Shell {
		// The reference init powers off after the marker; give it a moment
		// so the console and capture are complete.
		select {
		case <-g.proc.Exited():
		case <-time.After(3 * time.Second):
		}
	}
	v.Tail = g.con.Tail(20)
	return v
}

// Verdict is the current boot's verdict, once decided.
func (g *Guest) Verdict() (Verdict, bool) {
	b := g.current()
	if b == nil {
		return Verdict{}, false
	}
	return b.j.Verdict()
}
