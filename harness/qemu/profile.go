// Package qemu turns a boot chain (architecture + firmware) into a QEMU
// command line and runs it: acceleration chosen by a probe, QMP through
// go-qemu, and a process that never outlives its test or CLI run. It knows
// QEMU and nothing about the protocols the guest speaks.
package qemu

import (
	"fmt"
	"path/filepath"
	"sort"
	"strings"

	"nbh.dev/nbh/internal/fsutil"
)

// Firmware names, as the CLI and scenario tables spell them.
const (
	SeaBIOSIPXE = "seabios-ipxe" // x86_64: SeaBIOS + QEMU's iPXE option ROM
	OVMFIPXE    = "ovmf-ipxe"    // x86_64: OVMF + iPXE EFI driver ROM
	OVMFPXE     = "ovmf-pxe"     // x86_64: OVMF's own PXE, chainloading ipxe.efi
	UBoot       = "uboot"        // arm64: U-Boot qemu_arm64
	AAVMFGRUB   = "aavmf-grub"   // arm64: AAVMF UEFI PXE -> GRUB
	Direct      = "direct"       // either: -kernel/-initrd, the baseline
)

// Profile is one supported boot chain.
type Profile struct {
	Arch        string // amd64 or arm64
	Firmware    string
	Description string
}

// Name is "arch/firmware".
func (p Profile) Name() string { return p.Arch + "/" + p.Firmware }

// Profiles lists every supported chain.
var Profiles = []Profile{
	{"amd64", SeaBIOSIPXE, "SeaBIOS, QEMU's iPXE ROM: DHCP, iPXE script over HTTP, kernel and archive over HTTP"},
	{"amd64", OVMFIPXE, "OVMF (UEFI) with the iPXE EFI driver ROM: as seabios-ipxe, under UEFI"},
	{"amd64", OVMFPXE, "OVMF's own PXE: DHCP option 93 = 7 picks ipxe.efi, TFTP chainload, then as above"},
	{"amd64", Direct, "QEMU -kernel/-initrd with the same archive and network (baseline)"},
	{"arm64", UBoot, "U-Boot: DHCP, boot script and pxelinux config over TFTP, kernel and archive over TFTP"},
	{"arm64", AAVMFGRUB, "AAVMF (UEFI) PXE: option 93 = 11 picks a GRUB netboot image over TFTP, grub.cfg, kernel over HTTP"},
	{"arm64", Direct, "QEMU -kernel/-initrd with the same archive and network (baseline)"},
}

// Lookup finds the profile of arch and firmware.
func Lookup(arch, firmware string) (Profile, error) {
	var names []string
	for _, p := range Profiles {
		if p.Arch == arch && p.Firmware == firmware {
			return p, nil
		}
		if p.Arch == arch {
			names = append(names, p.Firmware)
		}
	}
	if names == nil {
		return Profile{}, fmt.Errorf("qemu: unknown architecture %q (amd64 or arm64)", arch)
	}
	sort.Strings(names)
	return Profile{}, fmt.Errorf("qemu: firmware %q is not available for %s (have: %s)", firmware, arch, strings.Join(names, ", "))
}

// Console is the kernel's serial console device name for arch.
func Console(arch string) string {
	if arch == "arm64" {
		return "ttyAMA0"
	}
	return "ttyS0"
}

// Binary is the QEMU system emulator for arch.
func Binary(arch string) string {
	if arch == "arm64" {
		return "qemu-system-aarch64"
	}
	return "qemu-system-x86_64"
}

// Files are the firmware files a profile needs, resolved by the caller.
type Files struct {
	OVMFCode, OVMFVars string // x86_64 UEFI (VARS is copied per guest)
	AAVMF              string // arm64 UEFI
	UBoot              string // arm64 U-Boot
	UBootEnv           string // its environment flash bank (per guest)
}

// Config describes one guest.
type Config struct {
	Profile
	Accel  Accel
	Memory int // MiB
	MAC    string
	Files  Files
	// Direct boot only.
	Kernel, Initrd, Append string
	// Dir is a private folder for per-guest files (UEFI variables, QMP).
	Dir string
	// QMP is the path of the QMP socket.
	QMP string
	// NetFD is the descriptor number QEMU inherits for the stream netdev.
	NetFD int
	// NetSocket, instead, is the path of a lab's unix socket the stream
	// netdev connects to (a QEMU the user starts: nbh serve). Such a QEMU
	// gets the console and its monitor on the user's terminal (Ctrl-A x
	// quits) and no QMP socket.
	NetSocket string
}

// Args builds the QEMU arguments (without the binary).
func Args(c Config) ([]string, error) {
	mem := c.Memory
	if mem == 0 {
		mem = 1024
	}
	// Serial on stdio (the console's terminal); no display. -nographic
	// makes SeaBIOS mirror its and the iPXE ROM's text to the serial port.
	a := []string{"-nodefaults", "-no-user-config", "-m", fmt.Sprint(mem), "-nographic"}
	if c.NetSocket != "" {
		// A QEMU the user runs: console and monitor on their terminal.
		a = append(a, "-serial", "mon:stdio", "-no-reboot",
			"-netdev", "stream,id=n0,server=off,addr.type=unix,addr.path="+c.NetSocket)
	} else {
		// No monitor on the console's terminal; QMP on a socket.
		a = append(a, "-monitor", "none",
			"-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
			"-no-reboot",
			"-qmp", "unix:"+c.QMP+",server=on,wait=off",
			"-netdev", fmt.Sprintf("stream,id=n0,addr.type=fd,addr.str=%d", c.NetFD))
	}
	a = append(a, c.Accel.Args(c.Arch)...)
	nic := "virtio-net-pci,netdev=n0,mac=" + c.MAC
	switch c.Arch {
	case "amd64":
		machine := "pc"
		if c.Firmware == OVMFIPXE || c.Firmware == OVMFPXE {
			machine = "q35"
		}
		a = append(a, "-machine", machine)
	case "arm64":
		a = append(a, "-machine", "virt")
	}
	switch c.Firmware {
	case Direct:
		if c.Kernel == "" || c.Initrd == "" {
			return nil, fmt.Errorf("qemu: direct boot needs a kernel and an initrd")
		}
		a = append(a, "-kernel", c.Kernel, "-initrd", c.Initrd, "-append", c.Append)
		nic += ",romfile="
	case SeaBIOSIPXE:
		// QEMU's default ROM (package ipxe-qemu): QEMU patches the PCI IDs
		// only into its default ROM, and firmware rejects an explicit
		// romfile= whose IDs do not match the device.
		nic += ",bootindex=1"
	case OVMFIPXE, OVMFPXE:
		vars := filepath.Join(c.Dir, "OVMF_VARS.fd")
		if err := fsutil.CopyFile(c.Files.OVMFVars, vars); err != nil {
			return nil, fmt.Errorf("qemu: %w", err)
		}
		a = append(a,
			"-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+c.Files.OVMFCode,
			"-drive", "if=pflash,format=raw,unit=1,file="+vars)
		if c.Firmware == OVMFIPXE {
			nic += ",bootindex=1" // QEMU's default iPXE ROM, as above
		} else {
			nic += ",romfile=,bootindex=1"
		}
	case UBoot:
		a = append(a, "-bios", c.Files.UBoot)
		if c.Files.UBootEnv != "" {
			a = append(a, "-drive", "if=pflash,format=raw,unit=1,file="+c.Files.UBootEnv)
		}
		nic += ",romfile="
	case AAVMFGRUB:
		a = append(a, "-bios", c.Files.AAVMF)
		nic += ",romfile=,bootindex=1"
	default:
		return nil, fmt.Errorf("qemu: unknown firmware %q", c.Firmware)
	}
	// An entropy source, so the guest's RNG is ready at once.
	a = append(a, "-device", nic, "-device", "virtio-rng-pci")
	return a, nil
}
