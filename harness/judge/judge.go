// Package judge decides how one boot of a guest ended. It reads the boot's
// console lines and its events on the lab timeline (stages, bytes moving,
// the services' refusals), runs the stage deadlines and the stall window,
// and settles one Verdict with its evidence. It knows nothing of QEMU or of
// the services: the lab hands it the lines and the timeline the events, so
// what decides a boot is all in one place and testable without a guest.
package judge

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"nbh.dev/nbh/harness/console"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/timeline"
)

// Rules are what a boot is judged by, besides the console table and the
// timeline's evidence.
type Rules struct {
	Expect *regexp.Regexp   // the success marker (nil: none; the boot cannot pass)
	Steps  []*regexp.Regexp // lines to see, in order, before the marker counts
	FailOn []FailOn         // the user's own failure signatures, before the table's
	// Passes says a console line that looks like a failure is none in this
	// boot (an IPv6 boot's loader reporting its IPv4 timeout). Optional.
	Passes func(line string) bool
	// StageTimeouts override DefaultStageTimeouts, stage by stage.
	StageTimeouts map[timeline.Stage]time.Duration
	// StallWindow is how long an open transfer may stand still: 0 for
	// DefaultStallWindow, negative for none.
	StallWindow time.Duration
	// OnStage is told each stage the boot reaches, in order. Optional.
	OnStage func(timeline.Event)
	// Drift is what the server's comparison of the served archive with
	// the root found for this boot: a stale archive, or why it could not
	// tell. wait gives a comparison under way a moment. Optional.
	Drift func(wait bool) (stale, unchecked string)
	// Machine says what the machine was doing when the boot stood still
	// (a deadline, a stalled transfer): evidence from the emulator for
	// the verdict's detail. It may take a few seconds, less when ctx
	// ends. Optional.
	Machine func(ctx context.Context) string
}

// FailOn is a failure signature of the user's: a console line matching
// Pattern ends the boot with Reason.
type FailOn struct {
	Pattern *regexp.Regexp
	Reason  failure.Reason
}

// Boot is the judge of one boot of one guest.
type Boot struct {
	tl    *timeline.Timeline
	guest string
	id    int
	rules Rules

	mu        sync.Mutex
	start     time.Time
	reached   timeline.Stage
	since     time.Time // when reached was reached, or the last progress
	stepsSeen int       // how many of Rules.Steps the console has shown, in order
	waiting   *waiting  // what the boot waits for, if a console line said so
	verdict   *Verdict
	progress  progress // the last bytes moved for the boot
	recent    []string // the console's last lines, context for the table

	decided chan struct{}

	// dhcpIgnored counts the DHCP messages the no-dhcp fault ignored.
	dhcpIgnored atomic.Int32
}

// New is the judge of boot id of guest, whose events are on tl. Its clock
// starts at Begin.
func New(tl *timeline.Timeline, guest string, id int, rules Rules) *Boot {
	return &Boot{tl: tl, guest: guest, id: id, rules: rules, decided: make(chan struct{})}
}

// Begin starts the boot's clock: QEMU's start, or the reset that began it.
func (b *Boot) Begin(at time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.start = at
}

// Start is when the boot began (zero before Begin).
func (b *Boot) Start() time.Time {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.start
}

// ID is the boot's number on the timeline.
func (b *Boot) ID() int { return b.id }

// Reached is the furthest stage of the boot so far.
func (b *Boot) Reached() timeline.Stage {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.reached
}

// Decided is closed once the boot has its verdict.
func (b *Boot) Decided() <-chan struct{} { return b.decided }

// IsDecided reports whether the boot has its verdict.
func (b *Boot) IsDecided() bool {
	select {
	case <-b.decided:
		return true
	default:
		return false
	}
}

// Verdict is the boot's verdict, once decided.
func (b *Boot) Verdict() (Verdict, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.verdict == nil {
		return Verdict{}, false
	}
	return *b.verdict, true
}

// Observe takes an event of the lab timeline (a subscriber): the boot's
// own events move its stage and its progress, and conclusive evidence ends
// it early. Other guests' and other boots' events are ignored.
func (b *Boot) Observe(e timeline.Event) {
	if e.Guest != b.guest || e.Boot != b.id {
		return
	}
	b.noteProgress(e)
	b.conclude(e)
	if e.Stage == timeline.None {
		return
	}
	b.mu.Lock()
	advanced := e.Stage > b.reached
	if advanced {
		b.reached, b.since = e.Stage, e.Time
		b.waiting = nil // the boot moved on
	}
	b.mu.Unlock()
	if advanced && b.rules.OnStage != nil {
		b.rules.OnStage(e)
	}
}

// Line judges a console line of the boot: a stage marker goes on the
// timeline, and the first line that is the marker (after every step) or a
// failure (the user's signatures, then the console table) decides the boot.
// Lines after the verdict are not judged.
func (b *Boot) Line(line console.Line) {
	b.mu.Lock()
	before := b.recent
	b.recent = append(b.recent, line.Text)
	if len(b.recent) > console.Context {
		b.recent = b.recent[1:]
	}
	b.mu.Unlock()
	if b.IsDecided() {
		return // the conversation after the verdict is not judged
	}
	tl := b.tl
	if st := console.StageOf(line.Text); st != timeline.None && st > b.Reached() {
		tl.Emit(timeline.Event{Source: "console", Kind: "stage", Guest: b.guest, Boot: b.id, Stage: st, Time: line.Time, Msg: line.Text})
	}
	b.noteWait(line)
	if b.step(line) {
		tl.Emit(timeline.Event{Source: "console", Kind: "marker", Guest: b.guest, Boot: b.id, Stage: timeline.Marker, Time: line.Time, Msg: line.Text})
		b.Decide(Verdict{OK: true, Stage: timeline.Marker, Line: line.Text})
		return
	}
	if f, ok := b.userFailure(line.Text); ok {
		tl.Emit(timeline.Event{Source: "console", Kind: "failure", Guest: b.guest, Boot: b.id, Time: line.Time, Msg: line.Text,
			Detail: map[string]any{"reason": string(f.Reason), "by": "fail-on " + f.Pattern.String(), "stage": b.Reached().String()}})
		b.Decide(Verdict{Reason: f.Reason, Stage: b.Reached(), Line: line.Text})
		return
	}
	if p, ok := console.Classify(line.Text, b.Reached(), before); ok && !b.passes(line.Text) {
		st := p.Stage
		if st == timeline.None {
			st = b.Reached()
		}
		tl.Emit(timeline.Event{Source: "console", Kind: "failure", Guest: b.guest, Boot: b.id, Time: line.Time, Msg: line.Text,
			Detail: map[string]any{"reason": string(p.Reason), "by": p.Who, "stage": st.String()}})
		b.Decide(Verdict{Reason: p.Reason, Stage: st, Line: line.Text})
	}
}

func (b *Boot) passes(line string) bool {
	return b.rules.Passes != nil && b.rules.Passes(line)
}

// userFailure matches a console line against the user's own signatures.
func (b *Boot) userFailure(line string) (FailOn, bool) {
	for _, f := range b.rules.FailOn {
		if f.Pattern.MatchString(line) {
			return f, true
		}
	}
	return FailOn{}, false
}

// step follows the console through Rules.Steps, in order, and reports
// whether the line is the success marker: Expect, once every step was seen.
// Each step reached is an "expect" event.
func (b *Boot) step(line console.Line) bool {
	steps := b.rules.Steps
	b.mu.Lock()
	n := b.stepsSeen
	if n < len(steps) && steps[n].MatchString(line.Text) {
		b.stepsSeen++
		// A step of the user's is progress: the stage's deadline starts
		// again (a systemd root spends a minute in stage root).
		b.since = line.Time
		b.mu.Unlock()
		b.tl.Emit(timeline.Event{Source: "console", Kind: "expect", Guest: b.guest, Boot: b.id, Time: line.Time, Msg: line.Text,
			Detail: map[string]any{"step": n + 1, "of": len(steps) + 1, "pattern": steps[n].String()}})
		return false
	}
	b.mu.Unlock()
	return n == len(steps) && b.rules.Expect != nil && b.rules.Expect.MatchString(line.Text)
}

// missedStep names the first expectation the boot did not reach.
func (b *Boot) missedStep() string {
	b.mu.Lock()
	n := b.stepsSeen
	b.mu.Unlock()
	steps := b.rules.Steps
	if len(steps) == 0 || b.rules.Expect == nil {
		return ""
	}
	re := b.rules.Expect
	if n < len(steps) {
		re = steps[n]
	}
	return fmt.Sprintf("expectation %d of %d not reached: %q", n+1, len(steps)+1, re.String())
}

// Watch ends the boot when it stays in one stage past that stage's
// deadline with nothing moving (a transfer's bytes, a step of the user's
// are progress), or when an open transfer stops moving for the stall
// window. It returns once the boot is decided or ctx ends (a later boot,
// the guest closed).
func (b *Boot) Watch(ctx context.Context) {
	limits := DefaultStageTimeouts()
	for st, d := range b.rules.StageTimeouts {
		limits[st] = d
	}
	stall := b.rules.StallWindow
	if stall == 0 {
		stall = DefaultStallWindow
	}
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-b.decided:
			return
		case <-ctx.Done():
			return
		case <-t.C:
		}
		b.mu.Lock()
		st, since, p := b.reached, b.since, b.progress
		if since.IsZero() {
			since = b.start
		}
		b.mu.Unlock()
		if since.IsZero() {
			continue // not begun
		}
		if p.open && stall > 0 && time.Since(p.at) > stall {
			msg := fmt.Sprintf("the %s transfer of %s stalled at %d bytes%s: nothing moved for %s", p.source, p.what, p.bytes, p.ofSize(), stall)
			detail := map[string]any{"source": p.source, "file": p.what, "bytes": p.bytes, "window": stall.Seconds()}
			msg = b.withMachine(ctx, msg, detail)
			if b.IsDecided() || ctx.Err() != nil {
				return // decided, or replaced, while the machine was sampled
			}
			b.tl.Emit(timeline.Event{Source: "lab", Kind: "stalled", Guest: b.guest, Boot: b.id, Msg: msg, Detail: detail})
			b.Decide(Verdict{Reason: failure.Stalled, Stage: st, Detail: msg})
			return
		}
		if d, ok := limits[st]; ok && d > 0 && time.Since(since) > d {
			msg := fmt.Sprintf("no progress past stage %s for %s", st, d)
			if !p.at.IsZero() {
				msg += fmt.Sprintf("; the last bytes moved %.0fs ago: %s %s, %d bytes%s", time.Since(p.at).Seconds(), p.source, p.what, p.bytes, p.ofSize())
			}
			detail := map[string]any{}
			msg = b.withMachine(ctx, msg, detail)
			if b.IsDecided() || ctx.Err() != nil {
				return
			}
			b.tl.Emit(timeline.Event{Source: "lab", Kind: "stage-deadline", Guest: b.guest, Boot: b.id, Msg: fmt.Sprintf("stage %s ran past %s", st, d), Detail: detail})
			b.Decide(Verdict{Reason: failure.Deadline, Stage: st, Detail: msg})
			return
		}
	}
}

// withMachine adds to msg, and to an event's detail, what Rules.Machine
// says the machine was doing.
func (b *Boot) withMachine(ctx context.Context, msg string, detail map[string]any) string {
	if b.rules.Machine == nil {
		return msg
	}
	m := b.rules.Machine(ctx)
	if m == "" {
		return msg
	}
	detail["machine"] = m
	return msg + "; " + m
}

// Decide settles the boot with v, unless it is settled: a failure is
// refined by the timeline's evidence first, and the archive's drift is
// added either way.
func (b *Boot) Decide(v Verdict) {
	if b.IsDecided() {
		return
	}
	elapsed := time.Since(b.Start())
	if !v.OK {
		v = b.refine(v)
		if v.Detail == "" {
			v.Detail = b.evidence()
		}
		v.Detail = joinDetail(b.missedStep(), v.Detail)
	}
	if b.rules.Drift != nil {
		stale, unchecked := b.rules.Drift(v.Reason != failure.Interrupted)
		switch {
		case stale != "" && v.OK:
			v.Warnings = append(v.Warnings, "stale archive: "+stale)
		case stale != "":
			v.Detail = joinDetail(v.Detail, "the server found the archive stale: "+stale)
		case unchecked != "":
			v.Warnings = append(v.Warnings, unchecked)
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.verdict != nil {
		return
	}
	v.Elapsed = elapsed
	b.verdict = &v
	close(b.decided)
}

// Refine corrects a console-based verdict with what the network saw: a
// loader that says "nothing to boot" when the DHCP server never answered it
// failed for want of a lease; a loader error right after the server said
// "not found" was a failed fetch. Consoles differ by firmware and version;
// the timeline does not. Decide refines every failure; Refine is for a
// verdict not (yet) decided.
func (b *Boot) Refine(v Verdict) Verdict { return b.refine(v) }

func (b *Boot) refine(v Verdict) Verdict {
	if v.Reason == failure.Deadline {
		b.mu.Lock()
		w := b.waiting
		b.mu.Unlock()
		if w != nil {
			if w.Stage != timeline.None {
				v.Stage = w.Stage
			}
			v.Reason, v.Line = w.Reason, w.line
			v.Detail = joinDetail(fmt.Sprintf("%s was still at this after %.0fs, at the deadline", w.Who, time.Since(w.since).Seconds()), v.Detail)
			v.Detail = joinDetail(v.Detail, b.evidence())
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
	for _, e := range b.tl.BootEvents(b.guest, b.id) {
		switch {
		case e.Source == "dhcp" && (e.Kind == "discover" || e.Kind == "ignored"):
			asked = true
		case e.Source == "dhcp" && e.Kind == "ack":
			answered = true
		case (e.Source == "tftp" || e.Source == "http") && (e.Kind == "transfer" || e.Kind == "not-found"):
			lastFetch = &e
		}
	}
	b.mu.Lock()
	p := b.progress
	b.mu.Unlock()
	if v.Reason == failure.LoaderFetch && p.open && time.Since(p.at) >= stalledBeforeGivingUp {
		// The loader gave up on a transfer that stood still (UEFI's HTTP
		// boot times out 5 s after the last byte, well inside the stall
		// window): the server stopped sending, which is a stall.
		v.Detail = joinDetail(fmt.Sprintf("the %s transfer of %s had stood still at %d bytes%s for %.1fs when the loader gave up", p.source, p.what, p.bytes, p.ofSize(), time.Since(p.at).Seconds()), v.Detail)
		v.Reason = failure.Stalled
		return v
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

// stalledBeforeGivingUp is how long an open transfer must have stood still
// for a loader's failed fetch to be the stall: longer than a transfer's
// progress events are apart (timeline.Meter: at most a second).
const stalledBeforeGivingUp = 2 * time.Second

// evidence is the boot's last telling network event, for a verdict's detail.
func (b *Boot) evidence() string {
	evs := b.tl.BootEvents(b.guest, b.id)
	for i := len(evs) - 1; i >= 0; i-- {
		e := evs[i]
		switch e.Kind {
		case "ignored", "not-found", "aborted", "refused", "error", "nak", "fired", "login-failed", "mount-refused", "read10-overflow":
			return fmt.Sprintf("last %s event: %s %s", e.Source, e.Kind, e.Msg)
		}
	}
	return ""
}

// waiting is a wait the console announced (console.Waiting).
type waiting struct {
	console.Wait
	line  string
	since time.Time
}

// noteWait follows the console's waits: a line that starts one, a later
// line that ends it.
func (b *Boot) noteWait(line console.Line) {
	w, starts := console.Waiting(line.Text)
	b.mu.Lock()
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
	b.mu.Unlock()
	if starts && !again {
		b.tl.Emit(timeline.Event{Source: "console", Kind: "waiting", Guest: b.guest, Boot: b.id, Time: line.Time, Msg: line.Text,
			Detail: map[string]any{"for": string(w.Reason), "by": w.Who}})
	}
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

// noteProgress follows the bytes services move for the boot (their
// "progress" events, timeline.Meter): moving bytes are progress against the
// stage's deadline, and a file transfer is watched for a stall until the
// service reports how it ended.
func (b *Boot) noteProgress(e timeline.Event) {
	b.mu.Lock()
	defer b.mu.Unlock()
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
