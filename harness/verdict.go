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

// observe follows the guest's events on the lab timeline.
func (g *Guest) observe(e timeline.Event) {
	if e.Guest != g.Name || g.closed() {
		// (A closed guest's subscription outlives it: a guest booted
		// again under its name is another.)
		return
	}
	if e.Source == "nfs" && e.Kind == "mount" && g.spec.Root == RootNFS {
		g.mu.Lock()
		first := !g.driftStarted && !g.isClosed
		g.driftStarted = true
		g.mu.Unlock()
		if first {
			go g.checkDrift()
		}
	}
	if e.Stage == timeline.None {
		return
	}
	g.mu.Lock()
	advanced := e.Stage > g.reached
	if advanced {
		g.reached, g.since = e.Stage, e.Time
		g.waiting = nil // the boot moved on
	}
	g.mu.Unlock()
	if advanced && g.spec.OnStage != nil {
		g.spec.OnStage(e)
	}
}

// watch ends the boot when it stays in one stage past that stage's deadline.
func (g *Guest) watch() {
	limits := map[timeline.Stage]time.Duration{}
	for st, d := range DefaultStageTimeouts {
		limits[st] = d
	}
	for st, d := range g.spec.StageTimeouts {
		limits[st] = d
	}
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-g.decided:
			return
		case <-t.C:
		}
		g.mu.Lock()
		st, since := g.reached, g.since
		g.mu.Unlock()
		if since.IsZero() {
			since = g.Start
		}
		if d, ok := limits[st]; ok && d > 0 && time.Since(since) > d {
			g.lab.Timeline.Emit(timeline.Event{Source: "lab", Kind: "stage-deadline", Guest: g.Name, Msg: fmt.Sprintf("stage %s ran past %s", st, d)})
			g.decide(Verdict{Reason: failure.Deadline, Stage: st, Detail: fmt.Sprintf("no progress past stage %s for %s", st, d)})
			return
		}
	}
}

// Reached is the furthest stage so far.
func (g *Guest) Reached() timeline.Stage {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.reached
}

// monitor reads console lines: stage markers go on the timeline, and the
// first line that matches the marker or the failure table decides the boot.
func (g *Guest) monitor() {
	tl := g.lab.Timeline
	var recent []string
	for line := range g.con.Lines() {
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
		if st := console.StageOf(line.Text); st != timeline.None && st > g.Reached() {
			tl.Emit(timeline.Event{Source: "console", Kind: "stage", Guest: g.Name, Stage: st, Time: line.Time, Msg: line.Text})
		}
		g.noteWait(line)
		if g.step(line) {
			tl.Emit(timeline.Event{Source: "console", Kind: "marker", Guest: g.Name, Stage: timeline.Marker, Time: line.Time, Msg: line.Text})
			g.decide(Verdict{OK: true, Stage: timeline.Marker, Line: line.Text})
			continue
		}
		if f, ok := g.userFailure(line.Text); ok {
			tl.Emit(timeline.Event{Source: "console", Kind: "failure", Guest: g.Name, Time: line.Time, Msg: line.Text,
				Detail: map[string]any{"reason": string(f.reason), "by": "fail-on " + f.re.String(), "stage": g.Reached().String()}})
			g.decide(Verdict{Reason: f.reason, Stage: g.Reached(), Line: line.Text})
			continue
		}
		if p, ok := console.Classify(line.Text, g.Reached(), before); ok && !g.passes(line.Text) {
			st := p.Stage
			if st == timeline.None {
				st = g.Reached()
			}
			tl.Emit(timeline.Event{Source: "console", Kind: "failure", Guest: g.Name, Time: line.Time, Msg: line.Text,
				Detail: map[string]any{"reason": string(p.Reason), "by": p.Who, "stage": st.String()}})
			g.decide(Verdict{Reason: p.Reason, Stage: st, Line: line.Text})
		}
	}
	// The console ended: QEMU exited.
	err := g.proc.ExitError()
	tl.Emit(timeline.Event{Source: "qemu", Kind: "exit", Guest: g.Name, Msg: fmt.Sprint(err)})
	if stderr := g.proc.Stderr(); err != nil && stderr != "" {
		g.decide(Verdict{Reason: failure.QEMUFailed, Stage: g.Reached(), Detail: stderr})
		return
	}
	g.decide(Verdict{Reason: failure.GuestStopped, Stage: g.Reached()})
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
func (g *Guest) step(line console.Line) bool {
	g.mu.Lock()
	n := g.stepsSeen
	if n < len(g.steps) && g.steps[n].MatchString(line.Text) {
		g.stepsSeen++
		// A step of the user's is progress: the stage's deadline starts
		// again (a systemd root spends a minute in stage root).
		g.since = line.Time
		g.mu.Unlock()
		g.lab.Timeline.Emit(timeline.Event{Source: "console", Kind: "expect", Guest: g.Name, Time: line.Time, Msg: line.Text,
			Detail: map[string]any{"step": n + 1, "of": len(g.steps) + 1, "pattern": g.steps[n].String()}})
		return false
	}
	g.mu.Unlock()
	return n == len(g.steps) && g.expect.MatchString(line.Text)
}

// missedStep names the first expectation the boot did not reach.
func (g *Guest) missedStep() string {
	g.mu.Lock()
	n := g.stepsSeen
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

func (g *Guest) decide(v Verdict) {
	elapsed := time.Since(g.Start)
	if !v.OK {
		v = g.refine(v)
		if v.Detail == "" {
			v.Detail = g.evidence()
		}
		v.Detail = joinDetail(g.missedStep(), v.Detail)
	}
	stale, unchecked := g.driftFound(v.Reason != failure.Interrupted)
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
	if g.verdict != nil {
		return
	}
	v.Elapsed = elapsed
	g.verdict = &v
	close(g.decided)
}

// refine corrects a console-based verdict with what the network saw: a
// loader that says "nothing to boot" when the DHCP server never answered it
// failed for want of a lease; a loader error right after the server said
// "not found" was a failed fetch. Consoles differ by firmware and version;
// the timeline does not.
func (g *Guest) refine(v Verdict) Verdict {
	if v.Reason == failure.Deadline {
		g.mu.Lock()
		w := g.waiting
		g.mu.Unlock()
		if w != nil {
			if w.Stage != timeline.None {
				v.Stage = w.Stage
			}
			v.Reason, v.Line = w.Reason, w.line
			v.Detail = joinDetail(fmt.Sprintf("%s was still at this after %.0fs, at the deadline", w.Who, time.Since(w.since).Seconds()), v.Detail)
			v.Detail = joinDetail(v.Detail, g.evidence())
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
	for _, e := range g.lab.Timeline.Events(g.Name) {
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

// waiting is a wait the console announced (console.Waits).
type waiting struct {
	console.Wait
	line  string
	since time.Time
}

// noteWait follows the console's waits: a line that starts one, a later
// line that ends it.
func (g *Guest) noteWait(line console.Line) {
	w, starts := console.Waiting(line.Text)
	g.mu.Lock()
	if cur := g.waiting; cur != nil && cur.Until != nil && cur.Until.MatchString(line.Text) {
		g.waiting = nil
	}
	again := false
	if starts {
		since := line.Time
		if cur := g.waiting; cur != nil && cur.Re == w.Re {
			since, again = cur.since, true // the same wait again: a retry loop
		}
		g.waiting = &waiting{Wait: w, line: line.Text, since: since}
	}
	g.mu.Unlock()
	if starts && !again {
		g.lab.Timeline.Emit(timeline.Event{Source: "console", Kind: "waiting", Guest: g.Name, Time: line.Time, Msg: line.Text,
			Detail: map[string]any{"for": string(w.Reason), "by": w.Who}})
	}
}

func joinDetail(a, b string) string {
	if a == "" || b == "" {
		return a + b
	}
	return a + "; " + b
}

// evidence is the guest's last telling network event, for a verdict's detail.
func (g *Guest) evidence() string {
	evs := g.lab.Timeline.Events(g.Name)
	for i := len(evs) - 1; i >= 0; i-- {
		e := evs[i]
		switch e.Kind {
		case "ignored", "not-found", "aborted", "refused", "error", "nak", "fired", "login-failed", "mount-refused", "read10-overflow":
			return fmt.Sprintf("last %s event: %s %s", e.Source, e.Kind, e.Msg)
		}
	}
	return ""
}

// Wait returns the verdict: the first of the marker, a classified failure,
// QEMU's exit, the spec's deadline or ctx's end. It never blocks past the
// deadline.
func (g *Guest) Wait(ctx context.Context) Verdict {
	deadline := time.NewTimer(time.Until(g.Start.Add(g.spec.Timeout)))
	defer deadline.Stop()
	select {
	case <-g.decided:
	case <-deadline.C:
		g.decide(Verdict{Reason: failure.Deadline, Stage: g.Reached(),
			Detail: fmt.Sprintf("no marker and no classified failure within %s", g.spec.Timeout)})
	case <-ctx.Done():
		g.decide(Verdict{Reason: failure.Interrupted, Stage: g.Reached(), Detail: ctx.Err().Error()})
	}
	g.mu.Lock()
	v := *g.verdict
	g.mu.Unlock()
	if v.OK {
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

// Verdict is the guest's verdict, once decided.
func (g *Guest) Verdict() (Verdict, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.verdict == nil {
		return Verdict{}, false
	}
	return *g.verdict, true
}
