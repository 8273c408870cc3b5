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
	// Unless, when set, cancels the row if it matches the line or one of
	// the few lines before (a loader probing for optional files is not
	// failing); Not cancels it if it matches the line itself.
	Unless, Not *regexp.Regexp
}

func row(re string, r failure.Reason, st, before timeline.Stage, who string) Pattern {
	return Pattern{Re: regexp.MustCompile(re), Reason: r, Stage: st, Before: before, Who: who}
}

func unless(p Pattern, re string) Pattern {
	p.Unless = regexp.MustCompile(re)
	return p
}

func not(p Pattern, re string) Pattern {
	p.Not = regexp.MustCompile(re)
	return p
}

// failures is the table of console lines that end a boot. Order matters: the
// first matching row wins, so specific rows come before general ones.
var failures = []Pattern{
	// Our own init names the step that failed.
	row(`nbh-init: FAIL dhcp:`, failure.NoDHCP, timeline.Init, 0, "init"),
	row(`nbh-init: FAIL modules:`, failure.ModuleLoad, timeline.Init, 0, "init"),
	row(`nbh-init: FAIL root:`, failure.RootMount, timeline.Root, 0, "init"),
	row(`nbh-init: FAIL archive-integrity:`, failure.CorruptArchive, timeline.Init, 0, "init"),
	row(`nbh-init: FAIL missing-module:`, failure.MissingModule, timeline.Root, 0, "init"),
	row(`nbh-init: FAIL archive: stale boot archive: modules for kernel`, failure.StaleArchive, timeline.Init, 0, "init"),
	row(`nbh-init: FAIL archive:`, failure.StaleArchive, timeline.Root, 0, "init"),
	row(`nbh-init: FAIL network: no network interface`, failure.NoNetDevice, timeline.Init, 0, "init"),
	row(`nbh-init: FAIL (\S+):`, failure.InitFailed, timeline.Init, 0, "init"),

	// Kernel.
	row(`VFS: Unable to mount root fs`, failure.RootMount, timeline.Root, 0, "kernel"),
	row(`Kernel panic - not syncing`, failure.KernelPanic, timeline.Kernel, 0, "kernel"),
	row(`(Unknown symbol \S+|disagrees about version of symbol)`, failure.ModuleLoad, timeline.Init, 0, "kernel"),
	row(`Initramfs unpacking failed`, failure.CorruptArchive, timeline.Kernel, 0, "kernel"),

	// Debian's initramfs-tools and dracut: their give-ups.
	row(`Gave up waiting for root (file system )?device`, failure.RootMount, timeline.Root, 0, "initramfs-tools"),
	row(`ALERT!\s+\S+ does not exist\.\s+Dropping to a shell`, failure.RootMount, timeline.Root, 0, "initramfs-tools"),
	row(`No init found\. Try passing init= bootarg|Target filesystem doesn't have requested \S+`, failure.InitFailed, timeline.Root, 0, "initramfs-tools"),
	row(`ipconfig: no devices to configure`, failure.NoNetDevice, timeline.None, 0, "initramfs-tools"),
	row(`Warning: /dev/\S+ does not exist|Warning: Could not boot\.`, failure.RootMount, timeline.Root, 0, "dracut"),
	row(`dracut: FATAL: |Entering emergency mode\.`, failure.InitFailed, timeline.None, 0, "dracut"),
	row(`Dropping to a shell!`, failure.InitFailed, timeline.None, 0, "initramfs-tools"),

	// iPXE: error messages end in an ipxe.org error URL.
	row(`No configuration methods succeeded`, failure.NoDHCP, timeline.DHCP, timeline.Kernel, "ipxe"),
	// sanboot: the iSCSI login (target name, CHAP) or the disk failed.
	row(`Could not (open|describe|boot) SAN device.*ipxe\.org/[0-9a-f]{8}`, failure.SANBoot, timeline.Loader, timeline.Kernel, "ipxe"),
	// (iPXE 1.21 first probes its TFTP server for autoexec.ipxe.)
	unless(row(`(?i)(no such file|not found|permission denied|connection (timed out|refused|reset)|input/output error).*ipxe\.org/[0-9a-f]{8}`, failure.LoaderFetch, timeline.Loader, timeline.Kernel, "ipxe"),
		`^autoexec\.ipxe\.\.\.`), // on the line, or the one before when the output splits
	row(`Could not boot image:.*ipxe\.org/[0-9a-f]{8}`, failure.LoaderError, timeline.Loader, timeline.Kernel, "ipxe"),

	// U-Boot.
	unless(row(`TFTP error: .*`, failure.LoaderFetch, timeline.Loader, timeline.Kernel, "u-boot"),
		`Filename 'pxelinux\.cfg/`), // "pxe get" probes several names
	row(`Retry time exceeded`, failure.NoDHCP, timeline.DHCP, timeline.Loader, "u-boot"),
	row(`(Bad Linux ARM64 Image magic|Wrong Image Format|ERROR: Did not find a cmdline Flattened Device Tree)`, failure.LoaderError, timeline.Loader, timeline.Kernel, "u-boot"),

	// UEFI Secure Boot's refusals, at the loader: GRUB asking shim to
	// verify the kernel; shim's dialog for a loader not signed for it (a
	// box drawn without line breaks: the words are somewhere in the line);
	// the firmware refusing the image it was to start (not signed by a key
	// in db, or revoked by dbx).
	row(`error: (bad shim signature|prohibited by secure boot policy)`, failure.SecureBoot, timeline.Loader, timeline.Kernel, "grub"),
	row(`Verification failed: \(0x1A\) Security Violation`, failure.SecureBoot, timeline.Loader, timeline.Kernel, "shim"),
	row(`BdsDxe: failed to (load|start) Boot\d+ ".*".*: (Access Denied|Security Violation)`, failure.SecureBoot, timeline.Loader, timeline.Kernel, "uefi"),

	// GRUB.
	row(`error: (bad signature|verification requested but nobody cares|public key .* not found)`, failure.BadSignature, timeline.Loader, timeline.Kernel, "grub"),
	row(`error: (file .* not found|.*couldn't find|.*timeout|.*connection refused|.*unresolvable|.*404)`, failure.LoaderFetch, timeline.Loader, timeline.Kernel, "grub"),
	// (GRUB's x86 Linux loader with Secure Boot off warns that it boots
	// with no video mode, and boots.)
	not(row(`^error: .*|grub rescue>`, failure.LoaderError, timeline.Loader, timeline.Kernel, "grub"),
		`^error: no suitable video mode found\.`),

	// UEFI firmware PXE.
	row(`PXE-E16|PXE-E51|PXE-E53`, failure.NoDHCP, timeline.DHCP, timeline.Loader, "uefi"),
	row(`PXE-E\d\d`, failure.LoaderFetch, timeline.Loader, timeline.Kernel, "uefi"),
	row(`BdsDxe: failed to load Boot\d+ ".*(PXE|HTTP).*": Not Found`, failure.FirmwareNoBoot, timeline.Firmware, timeline.Loader, "uefi"),
	// A CPU exception in an EFI image (a loader, or the kernel's EFI stub
	// running what a bad read left in memory): EDK2 halts the machine.
	row(`!!!! (X64|IA32|AARCH64|ARM) Exception Type`, failure.LoaderError, timeline.Loader, timeline.Init, "uefi"),

	// UEFI firmware HTTP boot (HttpBootDxe): the server's answer, then its
	// own summary of why the download failed.
	row(`^\s*(Client|Server) Error: \d{3}|Error: (Could not retrieve NBP file size|Could not establish connection with HTTP server|Server response timeout|Unexpected network error)`, failure.LoaderFetch, timeline.Loader, timeline.Kernel, "uefi"),

	// SeaBIOS.
	row(`No bootable device`, failure.FirmwareNoBoot, timeline.Firmware, timeline.Kernel, "seabios"),
}

// waits are console lines that say the boot waits for something that may
// never come (initramfs-tools waits 180 s for a network device). A wait
// ends at a later line matching Until (the step's "done.", the next step);
// a boot whose stage deadline runs out while it waits failed for the
// wait's Reason, with the wait's line as the evidence, rather than "deadline
// exceeded". Reason's stage is Stage, or None: the stage reached.
var waits = []Wait{
	{row(`Waiting up to \d+ secs for any network device`, failure.NoNetDevice, timeline.None, 0, "initramfs-tools"), initramfsStep},
	{row(`Begin: Waiting for root file system`, failure.RootMount, timeline.Root, 0, "initramfs-tools"), initramfsStep},
	// A refused NFS mount that the init retries until it gives up.
	{row(`mount call failed - server replied: `, failure.RootMount, timeline.Root, 0, "klibc nfsmount"), nil},
	{row(`mount\.nfs: mounting \S+ failed, reason given by server: `, failure.RootMount, timeline.Root, 0, "mount.nfs"), nil},
	{row(`Warning: dracut-initqueue: timeout, still waiting for following initqueue hooks`, failure.InitFailed, timeline.None, 0, "dracut"), nil},
	{row(`Warning: dracut-initqueue: starting timeout scripts`, failure.InitFailed, timeline.None, 0, "dracut"), nil},
}

// initramfsStep ends an initramfs-tools wait: "done." (log_end_msg) or the
// next "Begin:" step. log_begin_msg ends without a newline, so a wait's
// "done." shares its line unless a kernel message came in between.
var initramfsStep = regexp.MustCompile(`(^|\s)done\.|Begin: `)

// Wait is one row of waits.
type Wait struct {
	Pattern
	Until *regexp.Regexp
}

// Waiting returns the wait a console line starts, if any.
func Waiting(line string) (Wait, bool) {
	for _, w := range waits {
		if w.Re.MatchString(line) && !(w.Until != nil && endsOnSameLine(w, line)) {
			return w, true
		}
	}
	return Wait{}, false
}

// endsOnSameLine: "Begin: Waiting ... done." waited and got it.
func endsOnSameLine(w Wait, line string) bool {
	loc := w.Re.FindStringIndex(line)
	return loc != nil && w.Until.MatchString(line[loc[1]:])
}

// stages are console lines that start a stage. The init stage starts at the
// kernel's "Run /init as init process", whoever made the archive; the
// reference init and initramfs-tools also say when they start on the root.
var stages = []struct {
	Re    *regexp.Regexp
	Stage timeline.Stage
}{
	{regexp.MustCompile(`Linux version \d|Booting Linux on physical CPU|EFI stub: Booting Linux Kernel`), timeline.Kernel},
	{regexp.MustCompile(`Run /init as init process|nbh-init: started`), timeline.Init},
	{regexp.MustCompile(`nbh-init: mounting root|nbh-root:|Begin: Mounting root file system`), timeline.Root},
}

// Context is how many earlier lines Classify looks at for Unless.
const Context = 4

// Classify returns the first failure row matching line, given the stage
// reached so far and the lines just before it.
func Classify(line string, reached timeline.Stage, before []string) (Pattern, bool) {
next:
	for _, p := range failures {
		if p.Before != 0 && reached >= p.Before {
			continue
		}
		if !p.Re.MatchString(line) || p.Not != nil && p.Not.MatchString(line) {
			continue
		}
		if p.Unless != nil {
			for _, b := range append([]string{line}, before...) {
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
	for _, s := range stages {
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

// responders are the prompts answered by default.
var responders = []Responder{
	// iPXE waits 2 s for Ctrl-B; any other key ends the wait at once.
	{regexp.MustCompile(`Press Ctrl-B for the iPXE command line`), "\r", "skip iPXE's 2 s Ctrl-B prompt"},
}

// Respond returns the responder for line, if any.
func Respond(line string) (Responder, bool) {
	for _, r := range responders {
		if r.Re.MatchString(line) {
			return r, true
		}
	}
	return Responder{}, false
}
