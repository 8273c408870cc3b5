package scenarios

import (
	"context"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/timeline"
)

// TestSlowLink: on a link slow enough that GRUB's downloads (the arm64
// kernel, gzip-compressed, and the archive: tens of MB at 320 KiB/s)
// outlast the loader stage's deadline, the boot still passes, because
// bytes moving are progress. The deadline is the test's own, well below
// the downloads' time, so that the premise holds by construction (the
// default 90 s was within a second of the downloads once the kernel was
// served compressed).
func TestSlowLink(t *testing.T) {
	guestTest(t)
	if !selected("arm64", "aavmf-grub") {
		t.Skip("arm64/aavmf-grub not selected")
	}
	lab := nbhtest.NewLab(t)
	deadline := 30 * time.Second
	g, err := lab.Boot(context.Background(), harness.Spec{Arch: "arm64", Firmware: "aavmf-grub",
		Faults: []harness.Fault{fault(t, "slow-link")}, Timeout: 10 * time.Minute, Artifacts: nbhtest.Artifacts(t, "g1"),
		StageTimeouts: map[timeline.Stage]time.Duration{timeline.Loader: deadline}})
	assert.NilError(t, err)
	v := g.Wait(context.Background())
	assert.Assert(t, v.OK, "%v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
	var progress, fired int
	for _, e := range g.Events() {
		if e.Source == "http" && e.Kind == timeline.ProgressKind {
			progress++
		}
		if e.Source == "fault" && e.Kind == "fired" && e.Msg == "slow-link" {
			fired++
		}
	}
	assert.Check(t, fired > 0, "the slow-link rule never fired")
	assert.Check(t, progress > 10, "%d progress events from the downloads", progress)
	// By construction, not by this machine's speed: the downloads take
	// their size over the link's rate, much longer than the deadline.
	var loader time.Duration
	for _, s := range g.Spans() {
		if s.Stage == timeline.Loader {
			loader = s.Duration
		}
	}
	assert.Check(t, loader > deadline, "loader stage %s", loader)
	t.Logf("slow link: loader stage %.0fs, boot %.0fs\n%s", loader.Seconds(), v.Elapsed.Seconds(), timeline.Table(g.Spans(), g.BootStart()))
}

// TestStalledTransfer: a server that stops sending the archive halfway and
// keeps the transfer open is classified as a stalled transfer at the loader
// stage, from the stall window, over HTTP (iPXE) and TFTP (U-Boot).
func TestStalledTransfer(t *testing.T) {
	for _, c := range []struct{ arch, firmware, source string }{{"amd64", "seabios-ipxe", "http"}, {"arm64", "uboot", "tftp"}} {
		t.Run(c.arch+"/"+c.firmware, func(t *testing.T) {
			guestTest(t)
			if !selected(c.arch, c.firmware) {
				t.Skipf("%s/%s not selected", c.arch, c.firmware)
			}
			const window = 10 * time.Second
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(context.Background(), harness.Spec{Arch: c.arch, Firmware: c.firmware, StallWindow: window,
				Faults: []harness.Fault{fault(t, "stalled-transfer")}, Artifacts: nbhtest.Artifacts(t, "g1")})
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			assert.Assert(t, !v.OK, "booted despite a stalled transfer")
			assert.Equal(t, v.Reason, failure.Stalled, "%v", v.Err())
			assert.Equal(t, v.Stage, timeline.Loader, "%v", v.Err())
			assert.Check(t, is.Contains(v.Detail, "the "+c.source+" transfer of"))
			assert.Check(t, is.Contains(v.Detail, "nothing moved for "+window.String()))
			// The loader still runs, waiting for the bytes: what the
			// machine did says so (its monitor answered, it ran).
			assert.Check(t, is.Contains(v.Detail, "; the machine was "))
			var fired, stalled time.Time
			for _, e := range g.Events() {
				switch {
				case e.Kind == "fired" && e.Detail["fault"] == "stalled-transfer":
					fired = e.Time
				case e.Source == "lab" && e.Kind == "stalled":
					stalled = e.Time
				}
			}
			assert.Assert(t, !fired.IsZero() && !stalled.IsZero())
			t.Logf("stalled %.1fs after the server stopped: %v", stalled.Sub(fired).Seconds(), v.Err())
		})
	}
}
