package console

import (
	"regexp"

	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/timeline"
)

// Pattern is one row of the failure table: a console line matching Re means
// Reason, shown at Stage (None: the stage reached so far). Before, when set,
// limits the row to boots that have not yet reached that stage, so that a
// loader's "error:" is not confused with a kernel message.
type Pattern struct {
	Re     *regexp.Regexp
	Reason failure.Reason
	Stage  timeline.Stage
	Before timeline.Stage
	Who    string // what printed it, for the report
	// Unless, when set, cancels the row if it matches one of the few lines
	// before (a loader probing for optional files is not failing).
	Unless *regexp.Regexp
}

func row(re string, r failure.Reason, st, before timeline.Stage, who string) Pattern {
	return Pattern{Re: regexp.MustCompile(re), Reason: r, Stage: st, Before: before, Who: who}
}

func unless(p Pattern, re string) Pattern {
	p.Unless = regexp.MustCompile(re)
	return p
}

// Failures is the table of console lines that end a boot. Order matters: the
// first matching row wins, so specific rows come before general ones.
var Failures = []Pattern{
	// Our own init names the step that failed.
	row(`nbh-init: FAIL dhcp:`, failure.NoDHCP, timeline.Init, 0, "init"),
	row(`nbh-init: FAIL modules:`, failure.ModuleLoad, timeline.Init, 0, "init"),
	row(`nbh-init: FAIL root:`, failure.RootMount, timeline.Root, 0, "init"),
	row(`nbh-init: FAIL archive-integrity:`, failure.CorruptArchive, timeline.Init, 0, "init"),
	row(`nbh-init: FAIL missing-module:`, failure.MissingModule, timeline.Root, 0, "init"),
	row(`nbh-init: FAIL archive: stale boot archive: modules for kernel`, failure.StaleArchive, timeline.Init, 0, "init"),
	row(`nbh-init: FAIL archive:`, failure.StaleArchive, timeline.Root, 0, "init"),
	row(`nbh-init: FAIL (\S+):`, failure.InitFailed, timeline.Init, 0, "init"),

	// Kernel.
	row(`VFS: Unable to mount root fs`, failure.RootMount, timeline.Root, 0, "kernel"),
	row(`Kernel panic - not syncing`, failure.KernelPanic, timeline.Kernel, 0, "kernel"),
	row(`(Unknown symbol \S+|disagrees about version of symbol)`, failure.ModuleLoad, timeline.Init, 0, "kernel"),
	row(`Initramfs unpacking failed`, failure.CorruptArchive, timeline.Kernel, 0, "kernel"),

	// iPXE: error messages end in an ipxe.org error URL.
	row(`No configuration methods succeeded`, failure.NoDHCP, timeline.DHCP, timeline.Kernel, "ipxe"),
	row(`(?i)(no such file|not found|permission denied|connection (timed out|refused|reset)|input/output error).*ipxe\.org/[0-9a-f]{8}`, failure.LoaderFetch, timeline.Loader, timeline.Kernel, "ipxe"),
	row(`Could not boot image:.*ipxe\.org/[0-9a-f]{8}`, failure.LoaderError, timeline.Loader, timeline.Kernel, "ipxe"),

	// U-Boot.
	unless(row(`TFTP error: .*`, failure.LoaderFetch, timeline.Loader, timeline.Kernel, "u-boot"),
		`Filename 'pxelinux\.cfg/`), // "pxe get" probes several names
	row(`Retry time exceeded`, failure.NoDHCP, timeline.DHCP, timeline.Loader, "u-boot"),
	row(`(Bad Linux ARM64 Image magic|Wrong Image Format|ERROR: Did not find a cmdline Flattened Device Tree)`, failure.LoaderError, timeline.Loader, timeline.Kernel, "u-boot"),

	// GRUB.
	row(`error: (bad signature|verification requested but nobody cares|public key .* not found)`, failure.BadSignature, timeline.Loader, timeline.Kernel, "grub"),
	row(`error: (file .* not found|.*couldn't find|.*timeout|.*connection refused|.*unresolvable|.*404)`, failure.LoaderFetch, timeline.Loader, timeline.Kernel, "grub"),
	row(`^error: .*|grub rescue>`, failure.LoaderError, timeline.Loader, timeline.Kernel, "grub"),

	// UEFI firmware PXE.
	row(`PXE-E16|PXE-E51|PXE-E53`, failure.NoDHCP, timeline.DHCP, timeline.Loader, "uefi"),
	row(`PXE-E\d\d`, failure.LoaderFetch, timeline.Loader, timeline.Kernel, "uefi"),
	row(`BdsDxe: failed to load Boot\d+ ".*PXE.*": Not Found`, failure.FirmwareNoBoot, timeline.Firmware, timeline.Loader, "uefi"),

	// SeaBIOS.
	row(`No bootable device`, failure.FirmwareNoBoot, timeline.Firmware, timeline.Kernel, "seabios"),
}

// Stages are console lines that start a stage.
var Stages = []struct {
	Re    *regexp.Regexp
	Stage timeline.Stage
}{
	{regexp.MustCompile(`Linux version \d|Booting Linux on physical CPU|EFI stub: Booting Linux Kernel`), timeline.Kernel},
	{regexp.MustCompile(`nbh-init: started`), timeline.Init},
	{regexp.MustCompile(`nbh-init: mounting root|nbh-root:`), timeline.Root},
}

// Context is how many earlier lines Classify looks at for Unless.
const Context = 4

// Classify returns the first failure row matching line, given the stage
// reached so far and the lines just before it.
func Classify(line string, reached timeline.Stage, before []string) (Pattern, bool) {
next:
	for _, p := range Failures {
		if p.Before != 0 && reached >= p.Before {
			continue
		}
		if !p.Re.MatchString(line) {
			continue
		}
		if p.Unless != nil {
			for _, b := range before {
				if p.Unless.MatchString(b) {
					continue next
				}
			}
		}
		return p, true
	}
	return Pattern{}, false
}

// StageOf returns the stage a console line starts, or None.
func StageOf(line string) timeline.Stage {
	for _, s := range Stages {
		if s.Re.MatchString(line) {
			return s.Stage
		}
	}
	return timeline.None
}

// Responder types keys when a console line matches: firmware prompts that
// only wait for a key are answered at once instead of sitting out their
// timeout. Spec.KeepPrompts turns responders off, for timing the firmware
// exactly as shipped.
type Responder struct {
	Re   *regexp.Regexp
	Send string
	Why  string
}

// Responders are the prompts answered by default.
var Responders = []Responder{
	// iPXE waits 2 s for Ctrl-B; any other key ends the wait at once.
	{regexp.MustCompile(`Press Ctrl-B for the iPXE command line`), "\r", "skip iPXE's 2 s Ctrl-B prompt"},
}

// Respond returns the responder for line, if any.
func Respond(line string) (Responder, bool) {
	for _, r := range Responders {
		if r.Re.MatchString(line) {
			return r, true
		}
	}
	return Responder{}, false
}
