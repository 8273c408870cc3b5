package judge

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
	// ConclusiveIgnored is how many DHCP messages the silent server
	// ignores before the boot ends: the client has retried, so it is
	// waiting for an answer that cannot come.
	ConclusiveIgnored = 3
	// ConcludeGrace is how long the loader has to report a broken
	// download itself (iPXE and U-Boot do within a second).
	ConcludeGrace = 5 * time.Second
)

// conclude looks at one of the boot's events for conclusive evidence.
func (b *Boot) conclude(e timeline.Event) {
	switch {
	case e.Source == "dhcp" && e.Kind == "ignored":
		if n := b.dhcpIgnored.Add(1); n == ConclusiveIgnored {
			stage := max(b.Reached(), timeline.DHCP) // the reference init's own DHCP is at init
			b.decideAfter(0, Verdict{Reason: failure.NoDHCP, Stage: stage,
				Detail: fmt.Sprintf("the DHCP server ignored %d DHCP messages from this guest (no-dhcp): no lease can come, so the boot ends here", n)})
		}
	case e.Source == "lab" && e.Kind == "fired" && e.Detail["fault"] == "truncated-archive":
		b.decideAfter(ConcludeGrace, Verdict{Reason: failure.LoaderFetch, Stage: timeline.Loader,
			Detail: e.Msg + "; the loader did not report it within " + ConcludeGrace.String() + ", and the archive cannot arrive whole"})
	}
}

// decideAfter decides the boot with v after d unless it is decided first.
// It runs apart from the timeline's delivery (Decide reads the timeline).
func (b *Boot) decideAfter(d time.Duration, v Verdict) {
	go func() {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-b.decided:
		case <-t.C:
			b.Decide(v)
		}
	}()
}
