// Package qemu turns a boot chain (architecture + firmware) into a QEMU
// command line and runs it: acceleration chosen by a probe, QMP through a
// client of its own that matches replies to commands by id (qmp.go says why
// not go-qemu's), and a process that never outlives its test or CLI run. It knows
// QEMU and nothing about the protocols the guest speaks.
package qemu

import (
	"fmt"
	"path/filepath"
	"strings"

	"nbh.dev/nbh/internal/fsutil"
)

// Direct is the firmware name of the baseline chain: QEMU loads kernel and
// archive itself (-kernel/-initrd), no firmware, no loader.
const Direct = "direct"

// Profile is the QEMU side of one boot chain: which machine, how QEMU loads
// its firmware, and what the NIC carries. The chains themselves (what each
// needs from the network) are declared in package harness.
type Profile struct {
	Arch        string // amd64, arm64 or riscv64
	Firmware    string // the chain's name for its arch, e.g. seabios-ipxe
	Description string
	Machine     string // -machine
	Load        Load   // how QEMU loads the firmware
	// NICROM keeps QEMU's default iPXE option ROM on the NIC (the firmware
	// then boots through iPXE); otherwise the NIC has none (romfile=).
	NICROM bool
	// FwCfg are firmware settings passed as fw_cfg strings
	// (opt/org.tianocore/IPv4PXESupport=no).
	FwCfg [][2]string
	// SecureFlash gives the machine System Management Mode (smm=on) and
	// makes the UEFI variables flash writable from it only: what OVMF's
	// Secure Boot build requires.
	SecureFlash bool
}

// Load is how QEMU loads a chain's firmware.
type Load int

const (
	// LoadDefault: QEMU's own firmware (SeaBIOS on pc).
	LoadDefault Load = iota
	// LoadKernel: no firmware; -kernel/-initrd/-append (the direct chain).
	LoadKernel
	// LoadPflash: a UEFI code flash (Files.Code, read-only) and a per-guest
	// copy of its variables (Files.Vars).
	LoadPflash
	// LoadBIOS: -bios Files.Code, Files.Env as the second flash bank
	// when set (U-Boot's environment), and Files.Payload as -kernel when
	// set (the next stage the firmware jumps to: OpenSBI's U-Boot).
	LoadBIOS
)

// Name is "arch/firmware".
func (p Profile) Name() string { return p.Arch + "/" + p.Firmware }

// Console is the kernel's serial console device name for arch.
func Console(arch string) string {
	if arch == "arm64" {
		return "ttyAMA0"
	}
	return "ttyS0"
}

// Binary is the QEMU system emulator for arch.
func Binary(arch string) string {
	switch arch {
	case "arm64":
		return "qemu-system-aarch64"
	case "riscv64":
		return "qemu-system-riscv64" // Debian: qemu-system-misc
	}
	return "qemu-system-x86_64"
}

// Files are the firmware files a profile needs, resolved by the caller.
type Files struct {
	Code string // the firmware image (UEFI code flash, or -bios)
	Vars string // UEFI variables, copied per guest (LoadPflash)
	Env  string // a per-guest environment flash bank (LoadBIOS, U-Boot)
	// Payload is what firmware loaded with -bios jumps to, given as
	// -kernel (LoadBIOS: riscv64's OpenSBI, then U-Boot).
	Payload string
	// ROMs is a folder of NIC option ROMs QEMU takes as its own default
	// ones (-L: searched before its data folders, so it still patches
	// the device's PCI IDs into them), for a chain that boots through
	// the NIC's ROM.
	ROMs string
}

// Config describes one guest.
type Config struct {
	Profile
	Accel  Accel
	Memory int // MiB
	MAC    string
	// NIC is the network card model (LookupNIC); "" is virtio.
	NIC string
	// ROMFile is the user's option ROM for the NIC (a file), instead of
	// QEMU's own; it is loaded even on chains that boot without one.
	ROMFile string
	Files   Files
	// Direct boot only.
	Kernel, Initrd, Append string
	// Dir is a private folder for per-guest files (UEFI variables, QMP).
	Dir string
	// QMP is the path of the QMP socket.
	QMP string
	// NetFD is the descriptor number QEMU inherits for the stream netdev.
	NetFD int
	// UserNet, instead, puts the guest on QEMU's own user-mode network
	// (its built-in DHCP and TFTP server), for comparison with the lab's.
	UserNet *UserNet
	// TapNet, instead, puts it on a tap device (needs root).
	TapNet *TapNet
	// NetSocket, instead, is the path of a lab's unix socket the stream
	// netdev connects to (a QEMU the user starts: nbh serve). Such a QEMU
	// gets the console and its monitor on the user's terminal (Ctrl-A x
	// quits) and no QMP socket.
	NetSocket string
	// NetReconnect is the stream option (StreamReconnect) with which such
	// a QEMU connects when the socket appears and again after it went
	// away; "" on a QEMU that connects once.
	NetReconnect string
	// Incoming is a saved machine state (Process.SaveState) this QEMU
	// starts from instead of from reset: it comes up paused at the
	// moment the state was saved (WaitIncoming, then Cont).
	Incoming string
}

// StreamNetdev is the -netdev of a QEMU joining a lab through its unix
// socket at path, reconnecting with option reconnect ("" for none).
func StreamNetdev(path, reconnect string) string {
	n := "stream,id=n0,server=off,addr.type=unix,addr.path=" + path
	if reconnect != "" {
		n += "," + reconnect
	}
	return n
}

// UserNet is QEMU's user-mode network (slirp) as a boot network: the same
// addresses as a lab's (guest 10.0.2.15, server 10.0.2.2), its DHCP naming
// Bootfile, its TFTP serving TFTPRoot. restrict=on: the guest reaches
// nothing beyond those built-in services.
type UserNet struct {
	TFTPRoot, Bootfile string
}

// TapNet puts the guest's NIC on a tap device of a Linux network, instead
// of the lab's fabric: Ifname in the network namespace Netns (a name under
// /run/netns; QEMU is started inside it with ip netns exec). For a
// baseline the lab does not serve (BenchmarkNetboot's dnsmasq network).
type TapNet struct {
	Netns, Ifname string
}

// Args builds the QEMU arguments (without the binary), and the guest's
// copy of its UEFI variables in c.Dir.
func Args(c Config) ([]string, error) { return args(c, true) }

// args builds the arguments; with prepare false it writes nothing (a
// snapshot key is computed from them).
func args(c Config, prepare bool) ([]string, error) {
	mem := c.Memory
	if mem == 0 {
		mem = 1024
	}
	// Serial on stdio (the console's terminal); no display. -nographic
	// makes SeaBIOS mirror its and the iPXE ROM's text to the serial port.
	a := []string{"-nodefaults", "-no-user-config", "-m", fmt.Sprint(mem), "-nographic"}
	netdev := fmt.Sprintf("stream,id=n0,addr.type=fd,addr.str=%d", c.NetFD)
	if u := c.UserNet; u != nil {
		if strings.ContainsAny(u.TFTPRoot+u.Bootfile, ",") {
			return nil, fmt.Errorf("qemu: user network: a comma in %q or %q", u.TFTPRoot, u.Bootfile)
		}
		netdev = "user,id=n0,restrict=on,net=10.0.2.0/24,host=10.0.2.2,dhcpstart=10.0.2.15,tftp=" + u.TFTPRoot + ",bootfile=" + u.Bootfile
	}
	if t := c.TapNet; t != nil {
		if strings.ContainsAny(t.Ifname, ",=") || t.Ifname == "" {
			return nil, fmt.Errorf("qemu: tap device %q", t.Ifname)
		}
		netdev = "tap,id=n0,ifname=" + t.Ifname + ",script=no,downscript=no"
	}
	if c.NetSocket != "" {
		// A QEMU the user runs: console and monitor on their terminal.
		a = append(a, "-serial", "mon:stdio", "-no-reboot",
			"-netdev", StreamNetdev(c.NetSocket, c.NetReconnect))
	} else {
		// No monitor on the console's terminal; QMP on a socket.
		a = append(a, "-monitor", "none",
			"-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
			"-no-reboot",
			"-qmp", "unix:"+c.QMP+",server=on,wait=off",
			"-netdev", netdev)
	}
	a = append(a, c.Accel.Args(c.Arch)...)
	if c.Machine == "" {
		return nil, fmt.Errorf("qemu: profile %s names no machine", c.Name())
	}
	machine := c.Machine
	if c.SecureFlash {
		machine += ",smm=on"
	}
	a = append(a, "-machine", machine)
	model, err := LookupNIC(c.NIC)
	if err != nil {
		return nil, fmt.Errorf("qemu: %w", err)
	}
	if c.Files.ROMs != "" && c.Profile.NICROM && c.ROMFile == "" {
		a = append(a, "-L", c.Files.ROMs)
	}
	nic := model.Device + ",netdev=n0,mac=" + c.MAC
	switch {
	case c.ROMFile != "":
		if strings.Contains(c.ROMFile, ",") {
			return nil, fmt.Errorf("qemu: NIC ROM %q: a comma in the path", c.ROMFile)
		}
		nic += ",romfile=" + c.ROMFile
	case !c.Profile.NICROM:
		nic += ",romfile="
	}
	switch c.Load {
	case LoadKernel:
		if c.Kernel == "" || c.Initrd == "" {
			return nil, fmt.Errorf("qemu: direct boot needs a kernel and an initrd")
		}
		a = append(a, "-kernel", c.Kernel, "-initrd", c.Initrd, "-append", c.Append)
	case LoadDefault:
		if c.Files.Code != "" {
			a = append(a, "-bios", c.Files.Code) // the user's SeaBIOS build
		}
	case LoadPflash:
		vars := filepath.Join(c.Dir, "vars.fd")
		if prepare {
			if err := fsutil.CopyFile(c.Files.Vars, vars); err != nil {
				return nil, fmt.Errorf("qemu: %w", err)
			}
		}
		a = append(a,
			"-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+c.Files.Code,
			"-drive", "if=pflash,format=raw,unit=1,file="+vars)
		if c.SecureFlash {
			a = append(a, "-global", "driver=cfi.pflash01,property=secure,value=on")
		}
	case LoadBIOS:
		a = append(a, "-bios", c.Files.Code)
		if c.Files.Payload != "" {
			a = append(a, "-kernel", c.Files.Payload)
		}
		if c.Files.Env != "" {
			a = append(a, "-drive", "if=pflash,format=raw,unit=1,file="+c.Files.Env)
		}
	default:
		return nil, fmt.Errorf("qemu: profile %s: unknown firmware load %d", c.Name(), c.Load)
	}
	for _, kv := range c.FwCfg {
		a = append(a, "-fw_cfg", "name="+kv[0]+",string="+kv[1])
	}
	if c.Load != LoadKernel {
		// The NIC first in the boot order: the firmware boots from the
		// network at once.
		nic += ",bootindex=1"
	}
	// An entropy source, so the guest's RNG is ready at once.
	a = append(a, "-device", nic, "-device", "virtio-rng-pci")
	if c.Incoming != "" {
		// QEMU reads the state through a shell command (exec:); QEMU 7.2
		// has no file: migration URI. No RARP announcements once it is
		// loaded (for switches that must learn where a migrated guest
		// went): a machine booted from reset sends none.
		a = append(a, "-incoming", "exec:cat "+shellQuote(c.Incoming), "-global", "migration.announce-rounds=0")
	}
	return a, nil
}
