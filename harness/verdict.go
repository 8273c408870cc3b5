package harness

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"time"

	"nbh.dev/nbh/harness/console"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/timeline"
)

// Verdict is how a boot ended.
type Verdict struct {
	OK      bool
	Reason  failure.Reason // empty when OK
	Stage   timeline.Stage // where the failure showed; the furthest stage when OK
	Line    string         // the console line that decided, if any
	Detail  string         // further evidence (QEMU's stderr, the last network error)
	Elapsed time.Duration
	Tail    []string // last console lines
	// Warnings are what went wrong without failing the boot (an archive
	// that differs from the root it booted).
	Warnings []string
}

// Err is nil for a good boot, else an error describing the failure.
func (v Verdict) Err() error {
	if v.OK {
		return nil
	}
	return &BootError{v}
}

// BootError is a failed boot as an error.
type BootError struct{ V Verdict }

func (e *BootError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s at stage %s after %.1fs", e.V.Reason, e.V.Stage, e.V.Elapsed.Seconds())
	if e.V.Line != "" {
		fmt.Fprintf(&b, ": %q", e.V.Line)
	}
	if e.V.Detail != "" {
		fmt.Fprintf(&b, " (%s)", e.V.Detail)
	}
	return b.String()
}

// observe follows the guest's events on the lab timeline: those of its
// current boot only.
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
	g.noteProgress(b, e)
	if e.Stage == timeline.None {
		return
	}
	g.mu.Lock()
	advanced := e.Stage > b.reached
	if advanced {
		b.reached, b.since = e.Stage, e.Time
		b.waiting = nil // the boot moved on
	}
	g.mu.Unlock()
	if advanced && g.spec.OnStage != nil {
		g.spec.OnStage(e)
	}
}

// watch ends boot b when it stays in one stage past that stage's deadline
// with nothing moving (a transfer's bytes, a step of the user's are
// progress), or when a transfer it waits for stops moving for the stall
// window.
func (g *Guest) watch(b *boot) {
	limits := DefaultStageTimeouts()
	for st, d := range g.spec.StageTimeouts {
		limits[st] = d
	}
	stall := g.spec.StallWindow
	if stall == 0 {
		stall = DefaultStallWindow
	}
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-b.decided:
			return
		case <-b.ctx.Done(): // a later boot, or the guest closed
			return
		case <-t.C:
		}
		g.mu.Lock()
		st, since, p := b.reached, b.since, b.progress
		g.mu.Unlock()
		if since.IsZero() {
			since = b.start
		}
		if p.open && stall > 0 && time.Since(p.at) > stall {
			msg := fmt.Sprintf("the %s transfer of %s stalled at %d bytes%s: nothing moved for %s", p.source, p.what, p.bytes, p.ofSize(), stall)
			g.lab.tl.Emit(timeline.Event{Source: "lab", Kind: "stalled", Guest: g.Name, Boot: b.id, Msg: msg,
				Detail: map[string]any{"source": p.source, "file": p.what, "bytes": p.bytes, "window": stall.Seconds()}})
			g.decideBoot(b, Verdict{Reason: failure.Stalled, Stage: st, Detail: msg})
			return
		}
		if d, ok := limits[st]; ok && d > 0 && time.Since(since) > d {
			msg := fmt.Sprintf("no progress past stage %s for %s", st, d)
			if !p.at.IsZero() {
				msg += fmt.Sprintf("; the last bytes moved %.0fs ago: %s %s, %d bytes%s", time.Since(p.at).Seconds(), p.source, p.what, p.bytes, p.ofSize())
			}
			g.lab.tl.Emit(timeline.Event{Source: "lab", Kind: "stage-deadline", Guest: g.Name, Boot: b.id, Msg: fmt.Sprintf("stage %s ran past %s", st, d)})
			g.decideBoot(b, Verdict{Reason: failure.Deadline, Stage: st, Detail: msg})
			return
		}
	}
}

// Reached is the furthest stage of the current boot so far.
func (g *Guest) Reached() timeline.Stage {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.cur == nil {
		return timeline.None
	}
	return g.cur.reached
}

// monitor reads console lines: stage markers go on the timeline, and the
// first line that matches the marker or the failure table decides the boot.
func (g *Guest) monitor() {
	tl := g.lab.tl
	var recent []string
	for line := range g.con.Lines() {
		g.hear(line)
		b := g.current()
		if line.Time.Before(b.start) {
			continue // the end of the boot before a reset
		}
		before := recent
		recent = append(recent, line.Text)
		if len(recent) > console.Context {
			recent = recent[1:]
		}
		if r, ok := console.Respond(line.Text); ok && !g.spec.KeepPrompts {
			if err := g.con.Send(r.Send); err == nil {
				tl.Emit(timeline.Event{Source: "console", Kind: "responded", Guest: g.Name, Time: line.Time, Msg: r.Why})
			}
		}
		if isDecided(b) {
			continue // the conversation after the verdict is not judged
		}
		if st := console.StageOf(line.Text); st != timeline.None && st > g.Reached() {
			tl.Emit(timeline.Event{Source: "console", Kind: "stage", Guest: g.Name, Boot: b.id, Stage: st, Time: line.Time, Msg: line.Text})
		}
		g.noteWait(b, line)
		if g.step(b, line) {
			tl.Emit(timeline.Event{Source: "console", Kind: "marker", Guest: g.Name, Boot: b.id, Stage: timeline.Marker, Time: line.Time, Msg: line.Text})
			g.decideBoot(b, Verdict{OK: true, Stage: timeline.Marker, Line: line.Text})
			continue
		}
		if f, ok := g.userFailure(line.Text); ok {
			tl.Emit(timeline.Event{Source: "console", Kind: "failure", Guest: g.Name, Boot: b.id, Time: line.Time, Msg: line.Text,
				Detail: map[string]any{"reason": string(f.reason), "by": "fail-on " + f.re.String(), "stage": g.Reached().String()}})
			g.decideBoot(b, Verdict{Reason: f.reason, Stage: g.Reached(), Line: line.Text})
			continue
		}
		if p, ok := console.Classify(line.Text, g.Reached(), before); ok && !g.passes(line.Text) {
			st := p.Stage
			if st == timeline.None {
				st = g.Reached()
			}
			tl.Emit(timeline.Event{Source: "console", Kind: "failure", Guest: g.Name, Boot: b.id, Time: line.Time, Msg: line.Text,
				Detail: map[string]any{"reason": string(p.Reason), "by": p.Who, "stage": st.String()}})
			g.decideBoot(b, Verdict{Reason: p.Reason, Stage: st, Line: line.Text})
		}
	}
	// The console ended: QEMU exited.
	g.hearEnd()
	err := g.proc.ExitError()
	tl.Emit(timeline.Event{Source: "qemu", Kind: "exit", Guest: g.Name, Msg: fmt.Sprint(err)})
	if stderr := g.proc.Stderr(); err != nil && stderr != "" {
		g.decide(Verdict{Reason: failure.QEMUFailed, Stage: g.Reached(), Detail: stderr})
		return
	}
	g.decide(Verdict{Reason: failure.GuestStopped, Stage: g.Reached()})
}

// isDecided reports whether boot b has its verdict.
func isDecided(b *boot) bool {
	select {
	case <-b.decided:
		return true
	default:
		return false
	}
}

// failOn is a compiled Spec.FailOn.
type failOn struct {
	re     *regexp.Regexp
	reason failure.Reason
}

// userFailure matches a console line against the user's own signatures.
func (g *Guest) userFailure(line string) (failOn, bool) {
	for _, f := range g.failOn {
		if f.re.MatchString(line) {
			return f, true
		}
	}
	return failOn{}, false
}

// step follows the console through Spec.Steps, in order, and reports
// whether the line is the success marker: Expect, once every step was seen.
// Each step reached is an "expect" event.
func (g *Guest) step(b *boot, line console.Line) bool {
	g.mu.Lock()
	n := b.stepsSeen
	if n < len(g.steps) && g.steps[n].MatchString(line.Text) {
		b.stepsSeen++
		// A step of the user's is progress: the stage's deadline starts
		// again (a systemd root spends a minute in stage root).
		b.since = line.Time
		g.mu.Unlock()
		g.lab.tl.Emit(timeline.Event{Source: "console", Kind: "expect", Guest: g.Name, Boot: b.id, Time: line.Time, Msg: line.Text,
			Detail: map[string]any{"step": n + 1, "of": len(g.steps) + 1, "pattern": g.steps[n].String()}})
		return false
	}
	g.mu.Unlock()
	return n == len(g.steps) && g.expect.MatchString(line.Text)
}

// missedStep names the first expectation boot b did not reach.
func (g *Guest) missedStep(b *boot) string {
	g.mu.Lock()
	n := b.stepsSeen
	g.mu.Unlock()
	total := len(g.steps) + 1
	if total == 1 {
		return ""
	}
	re := g.expect
	if n < len(g.steps) {
		re = g.steps[n]
	}
	return fmt.Sprintf("expectation %d of %d not reached: %q", n+1, total, re.String())
}

// decide settles the current boot with v, unless it is settled.
func (g *Guest) decide(v Verdict) { g.decideBoot(g.current(), v) }

// decideBoot settles boot b with v, unless it is settled.
func (g *Guest) decideBoot(b *boot, v Verdict) {
	if isDecided(b) {
		return
	}
	elapsed := time.Since(b.start)
	if !v.OK {
		v = g.refine(b, v)
		if v.Detail == "" {
			v.Detail = g.evidence(b)
		}
		v.Detail = joinDetail(g.missedStep(b), v.Detail)
	}
	stale, unchecked := b.driftFound(g, v.Reason != failure.Interrupted)
	switch {
	case stale != "" && v.OK:
		v.Warnings = append(v.Warnings, "stale archive: "+stale)
	case stale != "":
		v.Detail = joinDetail(v.Detail, "the server found the archive stale: "+stale)
	case unchecked != "":
		v.Warnings = append(v.Warnings, unchecked)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if b.verdict != nil {
		return
	}
	v.Elapsed = elapsed
	b.verdict = &v
	close(b.decided)
}

// refine corrects a console-based verdict with what the network saw: a
// loader that says "nothing to boot" when the DHCP server never answered it
// failed for want of a lease; a loader error right after the server said
// "not found" was a failed fetch. Consoles differ by firmware and version;
// the timeline does not.
func (g *Guest) refine(b *boot, v Verdict) Verdict {
	if v.Reason == failure.Deadline {
		g.mu.Lock()
		w := b.waiting
		g.mu.Unlock()
		if w != nil {
			if w.Stage != timeline.None {
				v.Stage = w.Stage
			}
			v.Reason, v.Line = w.Reason, w.line
			v.Detail = joinDetail(fmt.Sprintf("%s was still at this after %.0fs, at the deadline", w.Who, time.Since(w.since).Seconds()), v.Detail)
			v.Detail = joinDetail(v.Detail, g.evidence(b))
			return v
		}
	}
	if v.Stage > timeline.Loader {
		return v
	}
	switch v.Reason {
	case failure.LoaderFetch, failure.LoaderError, failure.FirmwareNoBoot, failure.Deadline, failure.GuestStopped:
	default:
		return v
	}
	var asked, answered bool
	var lastFetch *timeline.Event
	for _, e := range g.lab.tl.BootEvents(g.Name, b.id) {
		switch {
		case e.Source == "dhcp" && (e.Kind == "discover" || e.Kind == "ignored"):
			asked = true
		case e.Source == "dhcp" && e.Kind == "ack":
			answered = true
		case (e.Source == "tftp" || e.Source == "http") && (e.Kind == "transfer" || e.Kind == "not-found"):
			lastFetch = &e
		}
	}
	if asked && !answered {
		v.Detail = joinDetail(v.Detail, "the DHCP server never acknowledged this guest")
		v.Reason, v.Stage = failure.NoDHCP, timeline.DHCP
		return v
	}
	if v.Reason == failure.LoaderError && lastFetch != nil && lastFetch.Kind == "not-found" {
		v.Detail = joinDetail(v.Detail, "the server had no "+lastFetch.Msg)
		v.Reason = failure.LoaderFetch
	}
	return v
}

// waiting is a wait the console announced (console.Waiting).
type waiting struct {
	console.Wait
	line  string
	since time.Time
}

// noteWait follows the console's waits: a line that starts one, a later
// line that ends it.
func (g *Guest) noteWait(b *boot, line console.Line) {
	w, starts := console.Waiting(line.Text)
	g.mu.Lock()
	if cur := b.waiting; cur != nil && cur.Until != nil && cur.Until.MatchString(line.Text) {
		b.waiting = nil
	}
	again := false
	if starts {
		since := line.Time
		if cur := b.waiting; cur != nil && cur.Re == w.Re {
			since, again = cur.since, true // the same wait again: a retry loop
		}
		b.waiting = &waiting{Wait: w, line: line.Text, since: since}
	}
	g.mu.Unlock()
	if starts && !again {
		g.lab.tl.Emit(timeline.Event{Source: "console", Kind: "waiting", Guest: g.Name, Boot: b.id, Time: line.Time, Msg: line.Text,
			Detail: map[string]any{"for": string(w.Reason), "by": w.Who}})
	}
}

func joinDetail(a, b string) string {
	if a == "" || b == "" {
		return a + b
	}
	return a + "; " + b
}

// evidence is boot b's last telling network event, for a verdict's detail.
func (g *Guest) evidence(b *boot) string {
	evs := g.lab.tl.BootEvents(g.Name, b.id)
	for i := len(evs) - 1; i >= 0; i-- {
		e := evs[i]
		switch e.Kind {
		case "ignored", "not-found", "aborted", "refused", "error", "nak", "fired", "login-failed", "mount-refused", "read10-overflow":
			return fmt.Sprintf("last %s event: %s %s", e.Source, e.Kind, e.Msg)
		}
	}
	return ""
}

// Wait returns the current boot's verdict: the first of the marker, a
// classified failure, QEMU's exit, the spec's deadline or ctx's end. It
// never blocks past the deadline. On a guest that never started it returns
// a Setup verdict.
func (g *Guest) Wait(ctx context.Context) Verdict {
	b := g.current()
	if b == nil || g.proc == nil {
		return Verdict{Reason: failure.Setup, Detail: "the guest was never started (Lab.Boot starts it; Provision only prepares it)"}
	}
	deadline := time.NewTimer(time.Until(b.start.Add(g.spec.Timeout)))
	defer deadline.Stop()
	select {
	case <-b.decided:
	case <-deadline.C:
		g.decideBoot(b, Verdict{Reason: failure.Deadline, Stage: g.Reached(),
			Detail: fmt.Sprintf("no marker and no classified failure within %s", g.spec.Timeout)})
	case <-ctx.Done():
		g.decideBoot(b, Verdict{Reason: failure.Interrupted, Stage: g.Reached(), Detail: ctx.Err().Error()})
	}
	g.mu.Lock()
	v := *b.verdict
	g.mu.Unlock()
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
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.cur == nil || g.cur.verdict == nil {
		return Verdict{}, false
	}
	return *g.cur.verdict, true
}
