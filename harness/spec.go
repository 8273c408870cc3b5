package harness

import (
	"fmt"
	"regexp"
	"strings"
	"time"

	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/harness/timeline"
)

// Spec describes one guest to boot.
type Spec struct {
	Arch     string // amd64, arm64 or riscv64
	Firmware string // a chain of Arch (AllChains), e.g. seabios-ipxe
	Name     string // guest name; default g1, g2, ...
	// MAC and IP pin the guest's Ethernet and leased address (a replay
	// gets the recorded guest's); default: the lab assigns them in boot
	// order.
	MAC, IP string

	// Family is what the guest boots over: "4" (IPv4, the default), "6"
	// (IPv6 only: router advertisements that say "managed", DHCPv6 with
	// option 59 boot file URLs, TFTP and HTTP over IPv6; Chain.IPv6) or
	// "dual" (both; the loaders use IPv4, the init configures both).
	Family string

	// Root is the root file system: RootNone (the archive only, the
	// default), RootNFS (the lab's NFS export of the reference root),
	// RootISCSI (the reference root as an ext4 LUN of the lab's target) or
	// RootSANBoot (a whole disk on the target that the loader SAN-boots).
	Root string

	// RootDir is the user's own root tree (a folder: a distribution root
	// made by mmdebstrap, debootstrap, a build system) for RootNFS (the
	// export) or RootISCSI (an ext4 image of it, made with mke2fs -d and
	// cached by the tree's content). RootImage is a raw disk or file-system
	// image for RootISCSI, served as the LUN. Each guest gets its own copy;
	// the user's files are only read unless RootWritable serves the tree
	// or image itself (the guest's writes land in it).
	RootDir, RootImage string
	RootWritable       bool
	// ArchiveFromRoot makes the reference archive carry these files of
	// the user's NFS root (RootDir), lines as nbh archive build's file
	// list takes them (a path, a glob or a folder; "config PATH" for
	// editable configuration), with the modules of the root's own kernel
	// when Kernel is the user's: the boot server then keeps that archive
	// current as it does the reference root's (and stale-config,
	// config-changed and archive-swap change the first editable one).
	ArchiveFromRoot []string

	// CHAP makes the iSCSI target require one-way CHAP from this guest;
	// the guest is told its credentials on the kernel command line (a
	// SAN boot: in its loader's script, and the iBFT tells the kernel).
	CHAP bool

	// NIC is the network card model (qemu.LookupNIC: virtio, the default,
	// e1000, e1000e, rtl8139, ...); the chain's firmware must drive it
	// (Chain.Drives). The reference archive carries the drivers of every
	// model and loads the one the machine has.
	NIC string

	Kernel string // kernel image; default: the cached Debian kernel (a relative path is from the working directory)
	Initrd string // boot archive; default: the reference archive
	Append string // added to the kernel command line

	// LoaderConfig is the user's own loader configuration for the chain's
	// loader (Chain.LoaderConfig: the iPXE script, U-Boot's pxelinux config
	// or grub.cfg), a Go text/template over bootcfg.Boot; nbh's own configs
	// are the default templates (bootcfg.IPXETemplate, ...). A guest ready
	// for any loader (AnyLoader) gets it for the loaders of its chain's kind
	// and nbh's defaults for the others.
	LoaderConfig string

	// Loader is the user's own boot file for the chain's firmware, served
	// in place of nbh's (Chain.LoaderFile: ipxe.efi, the GRUB netboot
	// image): their iPXE or GRUB build, shim. Checked before QEMU starts
	// (an EFI binary for the guest's architecture).
	Loader string
	// FirmwareCode and FirmwareVars are the user's own UEFI build (OVMF,
	// AAVMF: code and variable store) for the UEFI chains; BIOS is their
	// SeaBIOS or U-Boot build for seabios-ipxe and uboot; NICROM is their
	// option ROM for the NIC (an iPXE build). Each is checked before QEMU
	// starts (package fwcheck).
	FirmwareCode, FirmwareVars, BIOS, NICROM string

	// ArchiveFiles and RootFiles add host files to the reference archive
	// and to the guest's copy of the reference root (guest path -> host path).
	ArchiveFiles map[string]string
	RootFiles    map[string]string

	// NoArchiveRefresh stops the boot server from rebuilding the reference
	// archive when a file it carries a copy of changes on the guest's NFS
	// root (rebuilding is the default; see keeper).
	NoArchiveRefresh bool
	// OnStale is what the reference init does with a stale archive: "stop"
	// (the default: fail with "stale boot archive") or "warn" (boot on).
	OnStale string
	// Compression of the reference archive: "gzip" (default) or "zstd".
	Compression string
	// Signed makes the loader verify what it loads: the lab signs the
	// kernel, the archive and the loader's config with its own key and
	// builds the key into the loader, which refuses anything unsigned or
	// changed. Only GRUB (aavmf-grub) can; see README.
	Signed bool
	// SecureBoot turns UEFI Secure Boot on ("on") or off ("off") in the
	// chain's firmware; "" is the chain's default: on for the shim chains
	// (ovmf-shim, aavmf-shim), off for the others (SecureBootChains).
	// Where the firmware starts what the lab serves (the Unified Kernel
	// Image of ovmf-http and aavmf-http, iPXE and the kernel on ovmf-pxe
	// and aavmf-ipxe, a SAN disk's image) the lab signs it with a key of
	// its own, enrolled in the firmware's db.
	SecureBoot string
	// SecureBootCerts are certificate files (PEM or DER) added to the
	// firmware's db with Secure Boot on: the keys the user's own signed
	// loader or image was signed with.
	SecureBootCerts []string

	Faults []Fault
	// AnyLoader makes the boot server ready for any firmware of the arch:
	// the loader files of every chain, DHCP answering by what the client
	// says it is. For a guest whose QEMU the lab does not start (Provision).
	AnyLoader bool

	// UserNet boots the chain on QEMU's own user-mode network (its
	// built-in DHCP and TFTP) instead of the lab's: what a user would
	// otherwise pick, for comparison (BenchmarkNetboot). Only chains that
	// can boot over TFTP alone (Chain.UserNet), with no root and no fault;
	// the lab sees none of the guest's traffic, so stages come from the
	// console only.
	UserNet bool
	// TapNet puts the guest on a tap device of a Linux network instead of
	// the lab's fabric (needs root): the lab provisions its boot files in
	// Lab.ServedDir and answers none of its packets; whoever runs that
	// network serves them (BenchmarkNetboot's dnsmasq baseline). As with
	// UserNet: no root, no fault, no IPsec, stages from the console.
	TapNet *qemu.TapNet
	// KeepPrompts leaves firmware prompts to run out their timeouts instead
	// of answering them (see console.Respond).
	KeepPrompts bool
	Expect      string // regexp for success; default: the reference marker
	// Steps are console patterns (regexps) the boot must print, in this
	// order, before Expect counts: each one reached is a timeline event
	// ("expect", with its number) and restarts the current stage's
	// deadline (progress), and a boot that fails names the first one it
	// did not reach.
	Steps []string
	// FailOn are the user's own failure signatures: a console line
	// matching one ends the boot with its reason, before the built-in table
	// is asked.
	FailOn  []FailOn
	Memory  int           // MiB; default 1024
	Timeout time.Duration // overall deadline for Wait; default 180s
	// StageTimeouts bound how long a boot may stay in one stage with
	// nothing moving (no next stage, no step, no bytes of a transfer);
	// entries override DefaultStageTimeouts.
	StageTimeouts map[timeline.Stage]time.Duration
	// StallWindow is how long a file transfer the boot waits for (TFTP,
	// HTTP) may move no bytes before the boot ends as stalled; default
	// DefaultStallWindow, negative for none.
	StallWindow time.Duration

	// Shell keeps the guest running after its marker with a shell on the
	// console, for a conversation (Expect, Run, Reboot): the reference init
	// and root are told nbh.shell=1. A root of the user's that ends at a
	// login prompt needs nothing (Login).
	Shell bool

	// Artifacts is the folder for console.log, timeline.jsonl and
	// network.pcapng; default: a folder inside the lab, removed with it.
	Artifacts string
	// OnStage is called (from the lab's goroutines) when the guest reaches
	// a new stage; it must not block.
	OnStage func(timeline.Event)
	// OnEvent is called with each of the guest's timeline events as it
	// happens (and the lab-wide ones); it must not block.
	OnEvent func(timeline.Event)
}

// BringsNICDriver reports whether the user's own NIC ROM or firmware may
// drive a card nbh's firmware cannot (Chain.Drives).
func (s Spec) BringsNICDriver() bool {
	return s.NICROM != "" || s.FirmwareCode != "" || s.BIOS != ""
}

// FailOn is a failure signature of the user's: a console line matching
// Pattern (a regexp) means Reason (any words; a built-in reason's words,
// such as "kernel panic", make it that reason).
type FailOn struct {
	Pattern string `json:"pattern"`
	Reason  string `json:"reason"`
}

// ParseFailOn reads the CLI's spelling of a failure signature,
// REGEXP=REASON (split at the last "=").
func ParseFailOn(s string) (FailOn, error) {
	i := strings.LastIndex(s, "=")
	if i <= 0 || strings.TrimSpace(s[i+1:]) == "" {
		return FailOn{}, fmt.Errorf("fail-on %q: want REGEXP=REASON", s)
	}
	f := FailOn{Pattern: s[:i], Reason: strings.TrimSpace(s[i+1:])}
	if _, err := regexp.Compile(f.Pattern); err != nil {
		return FailOn{}, fmt.Errorf("fail-on %q: %w", s, err)
	}
	return f, nil
}

// Roots a guest can boot.
const (
	RootNone  = ""
	RootNFS   = "nfs"
	RootISCSI = "iscsi"
	// RootSANBoot is an iSCSI disk the loader boots from (iPXE's sanboot;
	// Chain.SANBoot): a GPT disk with an EFI system partition holding the
	// guest's Unified Kernel Image as the removable-media boot file, and
	// the reference root on ext4 beside it. The loader describes the disk
	// in the iBFT; the kernel's init reads it (iscsi_ibft), logs in again
	// and mounts the root from the same disk.
	RootSANBoot = "sanboot"
)

// Roots are the roots a guest can boot, in the matrix's order.
func Roots() []string { return []string{RootNone, RootNFS, RootISCSI, RootSANBoot} }

// ISCSITarget is the lab's iSCSI target name for the reference root; each
// guest gets its own copy of the LUN behind it.
const ISCSITarget = "iqn.2026-11.dev.nbh:root"

// NFSExport is the lab's NFS export of the reference root; each guest gets
// its own writable copy behind the same path.
const NFSExport = "/nbh/root"

// Spec is the guest's spec as Boot completed it: its name, MAC and address,
// marker, deadline and absolute paths filled in.
func (g *Guest) Spec() Spec {
	s := g.spec
	s.MAC, s.IP = g.MAC.String(), g.IP
	return s
}
