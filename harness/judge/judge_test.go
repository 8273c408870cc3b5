package judge

import (
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/console"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/timeline"
)

// judged is the judge of boot 1 of guest g1 on a fresh timeline, begun
// now and subscribed to the timeline as the lab does.
func judged(t *testing.T, rules Rules) (*Boot, *timeline.Timeline) {
	tl := timeline.New()
	b := New(tl, "g1", tl.NewBoot("g1"), rules)
	b.Begin(time.Now())
	t.Cleanup(tl.Subscribe(b.Observe))
	return b, tl
}

// verdictOf waits for b's verdict.
func verdictOf(t *testing.T, b *Boot) Verdict {
	t.Helper()
	select {
	case <-b.Decided():
	case <-time.After(10 * time.Second):
		t.Fatal("no verdict")
	}
	v, ok := b.Verdict()
	assert.Assert(t, ok)
	return v
}

func line(s string) console.Line { return console.Line{Text: s, Time: time.Now()} }

// TestRefineByNetworkEvidence: console wording differs per firmware; the
// timeline decides.
func TestRefineByNetworkEvidence(t *testing.T) {
	b, tl := judged(t, Rules{})
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "ignored", Guest: "g1", Msg: "no-dhcp fault: DISCOVER"})
	v := b.Refine(Verdict{Reason: failure.FirmwareNoBoot, Stage: timeline.Firmware, Line: "Nothing to boot"})
	assert.Equal(t, v.Reason, failure.NoDHCP)
	assert.Equal(t, v.Stage, timeline.DHCP)

	b, tl = judged(t, Rules{})
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "discover", Guest: "g1"})
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "ack", Guest: "g1"})
	tl.Emit(timeline.Event{Source: "http", Kind: "not-found", Guest: "g1", Msg: "/g1/vmlinuz 404"})
	v = b.Refine(Verdict{Reason: failure.LoaderError, Stage: timeline.Loader, Line: "error: you need to load the kernel first."})
	assert.Equal(t, v.Reason, failure.LoaderFetch)
	assert.Assert(t, strings.Contains(v.Detail, "/g1/vmlinuz"), v.Detail)

	// Past the loader, the console's word stands.
	v = b.Refine(Verdict{Reason: failure.KernelPanic, Stage: timeline.Kernel})
	assert.Equal(t, v.Reason, failure.KernelPanic)
}

// TestBootsAreApart: the judge of a second boot reads none of the first
// boot's events (the first boot asked DHCP in vain; the second got its
// lease), and the first boot's judge none of the second's.
func TestBootsAreApart(t *testing.T) {
	tl := timeline.New()
	first := New(tl, "g1", tl.NewBoot("g1"), Rules{})
	first.Begin(time.Now())
	defer tl.Subscribe(first.Observe)()
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "ignored", Guest: "g1", Msg: "DISCOVER"})
	second := New(tl, "g1", tl.NewBoot("g1"), Rules{})
	second.Begin(time.Now())
	defer tl.Subscribe(second.Observe)()
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "discover", Guest: "g1"})
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "ack", Guest: "g1"})
	tl.Emit(timeline.Event{Source: "console", Kind: "stage", Guest: "g1", Stage: timeline.Loader})

	v := second.Refine(Verdict{Reason: failure.FirmwareNoBoot, Stage: timeline.Firmware})
	assert.Equal(t, v.Reason, failure.FirmwareNoBoot, "boot 2 got its lease: %s", v.Detail)
	assert.Equal(t, second.Reached(), timeline.Loader)
	assert.Equal(t, first.Reached(), timeline.None, "boot 1 moved by boot 2's stage")
	v = first.Refine(Verdict{Reason: failure.FirmwareNoBoot, Stage: timeline.Firmware})
	assert.Equal(t, v.Reason, failure.NoDHCP, "boot 1 was never answered")
}

// TestLines: stages come from the console, the marker counts only after
// every step in order, the user's failure signatures come before the
// table's, and lines after the verdict are not judged.
func TestLines(t *testing.T) {
	var staged []timeline.Stage
	rules := Rules{
		Expect:  regexp.MustCompile(`^MARKER$`),
		Steps:   []*regexp.Regexp{regexp.MustCompile(`one`), regexp.MustCompile(`two`)},
		OnStage: func(e timeline.Event) { staged = append(staged, e.Stage) },
	}
	b, _ := judged(t, rules)
	b.Line(line("[    1.0] Run /init as init process"))
	b.Line(line("MARKER")) // no step seen yet
	b.Line(line("two"))    // out of order
	b.Line(line("one"))
	b.Line(line("MARKER")) // one step missing
	assert.Assert(t, !b.IsDecided())
	b.Line(line("two"))
	b.Line(line("MARKER"))
	v := verdictOf(t, b)
	assert.Assert(t, v.OK, "%v", v.Err())
	assert.DeepEqual(t, staged, []timeline.Stage{timeline.Init, timeline.Marker})
	b.Line(line("[    2.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000"))
	v, _ = b.Verdict()
	assert.Assert(t, v.OK, "a line after the verdict changed it")

	// A failure before the marker names the step it did not reach.
	b, _ = judged(t, rules)
	b.Line(line("one"))
	b.Line(line("[    2.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000"))
	v = verdictOf(t, b)
	assert.Equal(t, v.Reason, failure.KernelPanic)
	assert.Assert(t, strings.Contains(v.Detail, `expectation 2 of 3 not reached: "two"`), v.Detail)

	// The user's signature wins over the table; Passes silences the table.
	b, _ = judged(t, Rules{FailOn: []FailOn{{regexp.MustCompile(`Kernel panic`), "my-panic"}}})
	b.Line(line("[    2.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000"))
	assert.Equal(t, verdictOf(t, b).Reason, failure.Reason("my-panic"))
	b, _ = judged(t, Rules{Passes: func(string) bool { return true }})
	b.Line(line("[    2.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000"))
	assert.Assert(t, !b.IsDecided())
}

// TestDriftJoinsTheVerdict: what the archive comparison found is a warning
// on a good boot and evidence on a failed one.
func TestDriftJoinsTheVerdict(t *testing.T) {
	stale := func(bool) (string, string) { return "1 of 3 files differ: /etc/x", "" }
	b, _ := judged(t, Rules{Drift: stale})
	b.Decide(Verdict{OK: true, Stage: timeline.Marker})
	v, _ := b.Verdict()
	assert.DeepEqual(t, v.Warnings, []string{"stale archive: 1 of 3 files differ: /etc/x"})
	b, _ = judged(t, Rules{Drift: stale})
	b.Decide(Verdict{Reason: failure.RootMount, Stage: timeline.Root})
	v, _ = b.Verdict()
	assert.Assert(t, strings.Contains(v.Detail, "the server found the archive stale: 1 of 3"), v.Detail)
	assert.Equal(t, len(v.Warnings), 0)
}

// TestConclusiveEvidenceEndsTheBoot: a silent DHCP server settles the boot
// on the guest's third ignored message (not the first two); a broken-off
// archive settles it after the grace period unless the guest's own report
// comes first.
func TestConclusiveEvidenceEndsTheBoot(t *testing.T) {
	b, tl := judged(t, Rules{})
	for i := 0; i < ConclusiveIgnored-1; i++ {
		tl.Emit(timeline.Event{Source: "dhcp", Kind: "ignored", Guest: "g1", Stage: timeline.DHCP})
	}
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "ignored", Guest: "g2", Stage: timeline.DHCP}) // another guest's
	select {
	case <-b.Decided():
		t.Fatal("decided before the client retried enough")
	case <-time.After(200 * time.Millisecond):
	}
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "ignored", Guest: "g1", Stage: timeline.DHCP})
	v := verdictOf(t, b)
	assert.Equal(t, v.Reason, failure.NoDHCP)
	assert.Equal(t, v.Stage, timeline.DHCP)
	assert.Assert(t, strings.Contains(v.Detail, "ignored 3 DHCP messages"), v.Detail)

	// The loader reports the broken download itself within the grace: its
	// word stands.
	b, tl = judged(t, Rules{})
	tl.Emit(timeline.Event{Source: "lab", Kind: "fired", Guest: "g1", Msg: "truncated-archive: cut", Detail: map[string]any{"fault": "truncated-archive"}})
	b.Decide(Verdict{Reason: failure.LoaderFetch, Stage: timeline.Loader, Line: "Input/output error"})
	v, _ = b.Verdict()
	assert.Equal(t, v.Line, "Input/output error")
}

// TestDeadlinesCountProgress: bytes moving on a transfer keep a stage alive
// past its deadline, and a transfer that stops moving ends the boot as
// stalled, naming the file and how far it got; a finished transfer is not
// watched.
func TestDeadlinesCountProgress(t *testing.T) {
	start := func(stall time.Duration) (*Boot, *timeline.Timeline) {
		b, tl := judged(t, Rules{StallWindow: stall, StageTimeouts: map[timeline.Stage]time.Duration{timeline.Loader: 2 * time.Second}})
		tl.Emit(timeline.Event{Source: "tftp", Kind: "request", Guest: "g1", Stage: timeline.Loader, Msg: "g1/initrd"})
		ctx, cancel := context.WithCancel(context.Background())
		t.Cleanup(cancel)
		go b.Watch(ctx)
		return b, tl
	}

	// Moving: every 200 ms for 3 s, past the 2 s stage deadline, with a
	// stall window five times the pace (a loaded machine delays the
	// emitter).
	b, tl := start(time.Second)
	for i := 0; i < 15; i++ {
		tl.Emit(timeline.Event{Source: "tftp", Kind: timeline.ProgressKind, Guest: "g1", Msg: "g1/initrd",
			Detail: map[string]any{"bytes": int64(1000 * (i + 1)), "of": int64(1 << 20), "open": true}})
		time.Sleep(200 * time.Millisecond)
		assert.Assert(t, !b.IsDecided(), "decided while bytes moved")
	}
	// Then nothing: stalled, within the window (and before the deadline
	// would say "deadline").
	v := verdictOf(t, b)
	assert.Equal(t, v.Reason, failure.Stalled, "%v", v.Err())
	assert.Equal(t, v.Stage, timeline.Loader)
	assert.Assert(t, strings.Contains(v.Detail, "g1/initrd") && strings.Contains(v.Detail, "15000 bytes of 1048576"), v.Detail)

	// A finished transfer is not watched: the stage's deadline decides.
	b, tl = start(100 * time.Millisecond)
	tl.Emit(timeline.Event{Source: "tftp", Kind: timeline.ProgressKind, Guest: "g1", Msg: "g1/initrd",
		Detail: map[string]any{"bytes": int64(5), "of": int64(5), "open": true}})
	tl.Emit(timeline.Event{Source: "tftp", Kind: "transfer", Guest: "g1", Msg: "g1/initrd 5 bytes"})
	v = verdictOf(t, b)
	assert.Equal(t, v.Reason, failure.Deadline, "%v", v.Err())
	assert.Assert(t, strings.Contains(v.Detail, "the last bytes moved"), v.Detail)

	// The watch of a boot that was replaced ends without a verdict.
	b, _ = judged(t, Rules{StageTimeouts: map[timeline.Stage]time.Duration{timeline.None: 100 * time.Millisecond}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Watch(ctx); close(done) }()
	cancel()
	<-done
	assert.Assert(t, !b.IsDecided())
}

// A loader that gives up on a transfer standing still (UEFI's HTTP boot
// says "Server response timeout" 5 s after the last byte, inside the stall
// window) failed because the server stopped sending: stalled. A transfer
// still moving a moment ago, or one that ended, leaves the loader's own
// reason.
func TestLoaderGivingUpOnAStalledTransfer(t *testing.T) {
	for _, c := range []struct {
		name  string
		still time.Duration
		ended bool
		want  failure.Reason
	}{
		{"stood still", 3 * time.Second, false, failure.Stalled},
		{"moving", 200 * time.Millisecond, false, failure.LoaderFetch},
		{"ended", 3 * time.Second, true, failure.LoaderFetch},
	} {
		t.Run(c.name, func(t *testing.T) {
			b, tl := judged(t, Rules{})
			tl.Emit(timeline.Event{Source: "http", Kind: "request", Guest: "g1", Stage: timeline.Loader, Msg: "g1/boot.efi"})
			tl.Emit(timeline.Event{Source: "http", Kind: timeline.ProgressKind, Guest: "g1", Msg: "g1/boot.efi", Time: time.Now().Add(-c.still),
				Detail: map[string]any{"bytes": int64(36622749), "of": int64(40214016), "open": true}})
			if c.ended {
				tl.Emit(timeline.Event{Source: "http", Kind: "aborted", Guest: "g1", Msg: "g1/boot.efi after 36622749 bytes"})
			}
			b.Line(line("  Error: Server response timeout."))
			v := verdictOf(t, b)
			assert.Equal(t, v.Reason, c.want, "%v", v.Err())
			if c.want == failure.Stalled {
				assert.Assert(t, strings.Contains(v.Detail, "g1/boot.efi had stood still at 36622749 bytes of 40214016"), v.Detail)
			}
		})
	}
}

// A boot that stands still carries what the machine was doing then, in
// the verdict and on the timeline; a boot decided while the machine was
// sampled keeps its verdict and gets no deadline event.
func TestStandingStillSaysWhatTheMachineDid(t *testing.T) {
	deadline := map[timeline.Stage]time.Duration{timeline.None: 300 * time.Millisecond}
	machine := func(context.Context) string { return "the machine was idle" }
	b, tl := judged(t, Rules{Machine: machine, StageTimeouts: deadline})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go b.Watch(ctx)
	v := verdictOf(t, b)
	assert.Equal(t, v.Reason, failure.Deadline, "%v", v.Err())
	assert.Assert(t, strings.Contains(v.Detail, "the machine was idle"), v.Detail)
	assert.Equal(t, deadlineEvents(tl), 1)
	found := false
	for _, e := range tl.Events("g1") {
		if e.Kind == "stage-deadline" && e.Detail["machine"] == "the machine was idle" {
			found = true
		}
	}
	assert.Assert(t, found, "no stage-deadline event with the machine's state")

	// The marker arrives while the machine is sampled.
	var bp *Boot
	sampling := make(chan struct{})
	b, tl = judged(t, Rules{Expect: regexp.MustCompile("READY"), StageTimeouts: deadline, Machine: func(context.Context) string {
		close(sampling)
		bp.Line(line("READY"))
		return "the machine was busy"
	}})
	bp = b
	go b.Watch(ctx)
	<-sampling
	v = verdictOf(t, b)
	assert.Assert(t, v.OK, "%v", v.Err())
	assert.Equal(t, deadlineEvents(tl), 0)
}

func deadlineEvents(tl *timeline.Timeline) int {
	n := 0
	for _, e := range tl.Events("g1") {
		if e.Kind == "stage-deadline" {
			n++
		}
	}
	return n
}
