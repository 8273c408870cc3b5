package harness

import (
	"fmt"
	"time"

	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/timeline"
)

// Some boots are settled by the lab's own evidence long before the guest
// says so or a stage deadline runs out: a DHCP server that ignores the guest
// will ignore it forever (UEFI PXE retries for a minute), and an archive the
// boot server breaks off on purpose never arrives whole (GRUB waits 35 s for
// the rest). The rules below end such boots early, with the evidence as the
// verdict's detail. A guest's own report still wins when it comes first:
// the archive rule waits a grace period for the loader to say it.
const (
	// conclusiveIgnored is how many DHCP messages the silent server
	// ignores before the boot ends: the client has retried, so it is
	// waiting for an answer that cannot come.
	conclusiveIgnored = 3
	// concludeGrace is how long the loader has to report a broken
	// download itself (iPXE and U-Boot do within a second).
	concludeGrace = 5 * time.Second
)

// conclude watches the guest's events for conclusive evidence.
func (g *Guest) conclude(e timeline.Event) {
	b := g.current()
	if e.Guest != g.Name || b == nil || e.Boot != b.id {
		return
	}
	switch {
	case e.Source == "dhcp" && e.Kind == "ignored":
		if n := b.dhcpIgnored.Add(1); n == conclusiveIgnored {
			stage := max(g.Reached(), timeline.DHCP) // the reference init's own DHCP is at init
			g.concludeAfter(b, 0, Verdict{Reason: failure.NoDHCP, Stage: stage,
				Detail: fmt.Sprintf("the DHCP server ignored %d DHCP messages from this guest (no-dhcp): no lease can come, so the boot ends here", n)})
		}
	case e.Source == "lab" && e.Kind == "fired" && e.Detail["fault"] == "truncated-archive":
		g.concludeAfter(b, concludeGrace, Verdict{Reason: failure.LoaderFetch, Stage: timeline.Loader,
			Detail: e.Msg + "; the loader did not report it within " + concludeGrace.String() + ", and the archive cannot arrive whole"})
	}
}

// concludeAfter decides boot b with v after d unless it is decided first.
// It runs apart from the timeline's delivery (decide reads the timeline).
func (g *Guest) concludeAfter(b *boot, d time.Duration, v Verdict) {
	go func() {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-b.decided:
		case <-t.C:
			g.decideBoot(b, v)
		}
	}()
}
