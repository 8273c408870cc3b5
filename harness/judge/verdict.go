package judge

import (
	"fmt"
	"strings"
	"time"

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

// DefaultStageTimeouts are the per-stage deadlines. A stage that runs past
// its deadline ends the boot with the stage named, well before the overall
// deadline: a UEFI PXE client with no DHCP answer would otherwise retry for
// a minute and then try IPv6 for another.
func DefaultStageTimeouts() map[timeline.Stage]time.Duration {
	return map[timeline.Stage]time.Duration{
		timeline.Firmware: 60 * time.Second,
		timeline.DHCP:     30 * time.Second,
		timeline.Loader:   90 * time.Second,
		timeline.Kernel:   60 * time.Second,
		timeline.Init:     60 * time.Second,
		timeline.Root:     60 * time.Second,
	}
}

// DefaultStallWindow is how long a file transfer may stand still before the
// boot ends as stalled: loaders give up on a silent server after tens of
// seconds (iPXE, GRUB) or never; a working one never pauses this long.
const DefaultStallWindow = 15 * time.Second

func joinDetail(a, b string) string {
	if a == "" || b == "" {
		return a + b
	}
	return a + "; " + b
}
