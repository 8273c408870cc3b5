package harness

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"

	"nbh.dev/nbh/harness/bootcfg"
	"nbh.dev/nbh/harness/dhcp"
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/images"
)

// Chain is one boot chain, declared in one place (chainTable): how QEMU runs
// it, the firmware images it needs, what DHCP answers its firmware and
// loaders, the files its loader reads, and what it can do (which faults
// apply). Adding a chain is an entry in chainTable plus its loader's code.
type Chain struct {
	qemu.Profile
	// Code and Vars are the firmware images from the image cache (Load
	// LoadPflash or LoadBIOS); zero when QEMU's own firmware does.
	Code, Vars images.File
	// Payload is what the firmware jumps to (LoadBIOS, as -kernel):
	// riscv64's OpenSBI starts U-Boot.
	Payload images.File
	// DHCP is what the DHCP server answers the chain's firmware and its
	// loaders: the first rule whose client matches.
	DHCP []DHCPRule
	// Verifies: the loader checks signatures of what it loads (Spec.Signed,
	// the tampered-archive fault).
	Verifies bool
	// ReadsNFS: the loader can read kernel and archive from an NFS root
	// (the loader-nfs fault).
	ReadsNFS bool
	// IPv6: the chain boots over IPv6 (Spec.Family), with FwCfg6 over the
	// firmware's switches (an entry replaces the profile's of that name;
	// UEFI: no IPv4 attempt first).
	IPv6   bool
	FwCfg6 [][2]string
	// Passes6 matches console lines that are no failure in a boot over
	// IPv6: an attempt the firmware makes, and is meant to give up, first.
	Passes6 *regexp.Regexp
	// NoIPv6 says why a chain cannot boot over IPv6, where it is known.
	NoIPv6 string
	// SANBoot: the loader can boot from an iSCSI disk and describe it in
	// the iBFT (RootSANBoot).
	SANBoot bool
	// Stub, when set, makes the firmware fetch one Unified Kernel Image
	// (this EFI stub with kernel, archive and command line) instead of
	// kernel and archive.
	Stub images.File
	// UserNet is the boot file QEMU's own user-mode network names in its
	// DHCP offers ({guest} as in DHCPRule.File), for chains that can boot
	// over its TFTP alone (Spec.UserNet); "" for the others.
	UserNet string
	// LoaderConfig is what the chain's loader reads that a user's own
	// template (Spec.LoaderConfig) replaces: ConfigIPXE, ConfigPXELinux,
	// ConfigGRUB, or "" for a chain with no loader of nbh's making.
	LoaderConfig string
	// UEFI: the firmware is UEFI (OVMF, AAVMF), whether from pflash or
	// -bios: a user's build of it is Spec.FirmwareCode, not Spec.BIOS.
	UEFI bool
	// NICs are the NIC models besides virtio the chain's firmware can boot
	// from (qemu.LookupNIC); chains that boot through the NIC's iPXE ROM
	// (NICROM) and direct boots take any model (Drives).
	NICs []string
	// GzipKernel: the loader reads the kernel gzip-compressed and
	// decompresses it (GRUB's gzio), so the reference kernel is served
	// compressed (images.Cache.Gzipped), as a distribution that ships its
	// arm64 kernel compressed serves it: a third of the bytes over the
	// loader's slow network. A kernel of the user's is served as given.
	GzipKernel bool
	// Cost is what a row of the chain takes, for the matrix's shards.
	Cost Cost
	// Secure is the chain's firmware with UEFI Secure Boot; nil for a
	// chain that cannot boot with it.
	Secure *SecureFirmware
	// SecureBoot: this boot of the chain has Secure Boot on (the chain's
	// default, or Spec.SecureBoot; WithSecureBoot).
	SecureBoot bool

	// loader writes what the chain's loader reads into the served root:
	// dir is the guest's folder there, b what to boot.
	loader func(ctx context.Context, g *Guest, dir string, b bootcfg.Boot, p plan) error
	// env makes the guest's firmware environment flash (U-Boot), from the
	// firmware image at code.
	env func(g *Guest, code string) (string, error)
	// vars6, when set, writes the guest's copy of the firmware's variables
	// for a boot over IPv6 (from vars) and returns its path.
	vars6 func(g *Guest, vars string) (string, error)
}

// SecureFirmware is a chain's firmware with UEFI Secure Boot: Microsoft's
// keys enrolled (PK, KEK, db with Microsoft's UEFI CA, which signs shim),
// so it starts only images signed by a key in db, and none whose hash or
// signer is in dbx.
type SecureFirmware struct {
	Code, Vars images.File
	// SMM: the variables are writable only from System Management Mode
	// (OVMF's Secure Boot build): QEMU gives the machine SMM and the
	// flash its secure property, or nothing could stop an OS from
	// rewriting db.
	SMM bool
	// Default: the chain boots with Secure Boot unless Spec.SecureBoot is
	// "off" (a shim chain); else only when it is "on".
	Default bool
	// Signs: the firmware starts images the lab serves (a Unified Kernel
	// Image; iPXE and the kernel it hands the firmware), which the lab
	// signs with its own key, enrolled in db.
	Signs bool
}

// Spec.SecureBoot's values.
const (
	SecureBootOn  = "on"
	SecureBootOff = "off"
)

// WithSecureBoot is the chain as a boot with Spec.SecureBoot want ("", on,
// off) runs it: Secure Boot on or off, with the firmware that does it.
func (c Chain) WithSecureBoot(want string) (Chain, error) {
	switch want {
	case "":
		c.SecureBoot = c.Secure != nil && c.Secure.Default
	case SecureBootOn:
		if c.Secure == nil {
			return c, fmt.Errorf("secure boot: %s cannot boot with UEFI Secure Boot; %s can", c.Name(), strings.Join(SecureBootChains(), ", "))
		}
		c.SecureBoot = true
	case SecureBootOff:
		c.SecureBoot = false
	default:
		return c, fmt.Errorf("secure boot %q: want on or off", want)
	}
	c.SecureFlash = c.SecureBoot && c.Secure.SMM
	if c.SecureBoot {
		// Secure Boot's keys live in the variables flash: firmware
		// that QEMU otherwise loads with -bios (aavmf-ipxe) runs from
		// code and variables flash with it.
		c.Load = qemu.LoadPflash
	}
	return c, nil
}

// Each chain in the table as it boots by default (Secure Boot on for the
// shim chains).
func init() {
	for i, c := range chainTable {
		chainTable[i], _ = c.WithSecureBoot("")
	}
}

// signsImage: this boot's firmware verifies images the lab signs (a
// Unified Kernel Image, iPXE and the kernel it starts) under Secure Boot.
func (c Chain) signsImage() bool { return c.SecureBoot && c.Secure.Signs }

// signsArchive: the image the firmware verifies holds the archive (a
// signed Unified Kernel Image).
func (c Chain) signsArchive() bool { return c.signsImage() && c.Stub.Path != "" }

// The loader configurations a user's template can replace (Chain.LoaderConfig).
const (
	ConfigIPXE     = "iPXE script"
	ConfigPXELinux = "pxelinux config"
	ConfigGRUB     = "grub.cfg"
)

// Cost is a chain's expected wall times in seconds under TCG on a 2-core
// machine, one boot at a time, from full serial matrix runs.
type Cost struct {
	Boot   float64 // a clean boot with no root, to the marker
	Loader float64 // until the loader's first fetch: where loader faults end
	NoDHCP float64 // until the third ignored DHCP message (EDK2 waits 4 and 8 s)
	// Truncated is a truncated-archive row, when the loader does not give
	// up at the break (0: as Loader).
	Truncated float64
}

// DHCPRule is one DHCP answer: for which client, which boot file.
type DHCPRule struct {
	Client string // the client it matches, in words (for the timeline)
	Match  func(dhcp.Client) bool
	// File is the boot file: a TFTP path or a URL; {server} and {guest}
	// stand for the boot server's address and the guest's name.
	File string
	// Loader: the file is the loader binary the firmware starts (ipxe.efi,
	// a GRUB netboot image), which a user's own (Spec.Loader) replaces.
	Loader bool
}

// answer fills in the rule's boot file for a guest; loader, when set, is
// the file of the guest's own loader binary (Spec.Loader), in its folder.
func (r DHCPRule) answer(server, guest, loader string) dhcp.Boot {
	f := r.File
	if r.Loader && loader != "" {
		f = "{guest}/" + loader
	}
	file := strings.NewReplacer("{server}", server, "{guest}", guest).Replace(f)
	return dhcp.Boot{File: file, Why: r.Client + ": " + file}
}

// The DHCP rules the chains share.
var (
	ipxeScript = DHCPRule{Client: "iPXE (user class / option 175)", File: "http://{server}/{guest}/boot.ipxe",
		Match: func(c dhcp.Client) bool { return c.IPXE }}
	pxeX64 = func(file string) DHCPRule {
		return DHCPRule{Client: "UEFI PXE, option 93 = 7 (x86-64)", File: file, Loader: true,
			Match: func(c dhcp.Client) bool {
				return !c.IPXE && (c.Arch == dhcp.ArchEFIx64 || c.Arch == dhcp.ArchEFIBC) && !httpClient(c)
			}}
	}
	pxeArm64 = func(file string) DHCPRule {
		return DHCPRule{Client: "UEFI PXE, option 93 = 11 (arm64)", File: file, Loader: true,
			Match: func(c dhcp.Client) bool { return !c.IPXE && c.Arch == dhcp.ArchEFIArm64 && !httpClient(c) }}
	}
	httpBoot = func(arch int, file string) DHCPRule {
		return DHCPRule{Client: fmt.Sprintf("UEFI HTTP boot (HTTPClient, option 93 = %d)", arch), File: file,
			Match: func(c dhcp.Client) bool { return httpClient(c) && c.Arch == arch }}
	}
	ubootScript = DHCPRule{Client: "U-Boot vendor class", File: "boot.scr.uimg",
		Match: func(c dhcp.Client) bool { return strings.HasPrefix(c.VendorClass, "U-Boot") }}
)

func httpClient(c dhcp.Client) bool { return strings.HasPrefix(c.VendorClass, "HTTPClient") }

// UEFI HTTP boot's option 93 values (RFC 4578 as IANA extended it).
const (
	archHTTPx64   = 16
	archHTTPArm64 = 19
)

// noPXE switches EDK2's PXE off, so the firmware goes straight to HTTP
// boot instead of waiting out PXE first (v4, then v6 for up to a minute).
// httpV6 are the firmware switches of UEFI HTTP boot over IPv6: no IPv4
// (else HTTPv4 takes a minute first), and PXEv6 left on, before HTTPv6.
// Debian 12's EDK2 (2022.11) starts HTTPv6's DHCPv6 before IPv6 duplicate
// address detection is done, fails with EFI_NO_MAPPING at once and sends
// nothing (fixed upstream in edk2-stable202508, 11f1d28bcb); PXEv6 waits
// for it. So, as on a machine with both on, PXEv6 asks first, the DHCPv6
// server gives it an address without a boot file (no PXE rule: 5 s), and
// HTTPv6 then finds its link-local address ready.
var httpV6 = [][2]string{{"opt/org.tianocore/IPv4Support", "no"}, {"opt/org.tianocore/IPv6PXESupport", "yes"}}

// pxeV6GivesUp is that PXEv6 attempt ending (a PXE client without a boot
// file), which HTTP boot chains pass over; PXE-E16 (no offer) still fails.
var pxeV6GivesUp = regexp.MustCompile(`PXE-E21: Remote boot cancelled|BdsDxe: failed to load Boot\d+ "UEFI PXEv6 `)

var noPXE = [][2]string{{"opt/org.tianocore/IPv4PXESupport", "no"}, {"opt/org.tianocore/IPv6PXESupport", "no"}}

// chainTable is every chain nbh boots, per architecture, the baselines last.
// Where several chains' rules match one client (a guest ready for any
// loader, nbh serve), the first in this order answers.
var chainTable = []Chain{
	{
		Profile: qemu.Profile{Arch: "amd64", Firmware: "seabios-ipxe", Machine: "pc", NICROM: true,
			Description: "SeaBIOS, the NIC's iPXE ROM: DHCP, iPXE script over HTTP, kernel and archive over HTTP"},
		DHCP: []DHCPRule{ipxeScript}, loader: ipxeLoader, LoaderConfig: ConfigIPXE, ReadsNFS: true, UserNet: "{guest}/boot.ipxe", IPv6: true,
		Cost: Cost{Boot: 7, Loader: 1, NoDHCP: 6},
	},
	{
		Profile: qemu.Profile{Arch: "amd64", Firmware: "ovmf-ipxe", Machine: "q35", Load: qemu.LoadPflash, NICROM: true,
			Description: "OVMF (UEFI) with the iPXE EFI driver ROM: as seabios-ipxe, under UEFI"},
		Code: images.OVMFCode(), Vars: images.OVMFVars(), UEFI: true,
		DHCP: []DHCPRule{ipxeScript}, loader: ipxeLoader, LoaderConfig: ConfigIPXE, ReadsNFS: true, SANBoot: true, IPv6: true,
		Cost: Cost{Boot: 11.5, Loader: 4.5, NoDHCP: 6},
	},
	{
		Profile: qemu.Profile{Arch: "amd64", Firmware: "ovmf-pxe", Machine: "q35", Load: qemu.LoadPflash,
			Description: "OVMF's own PXE: DHCP option 93 = 7 picks ipxe.efi, TFTP chainload, then as above"},
		Code: images.OVMFCode(), Vars: images.OVMFVars(), UEFI: true,
		DHCP: []DHCPRule{ipxeScript, pxeX64("ipxe.efi")}, LoaderConfig: ConfigIPXE, loader: ipxeChainload(images.IPXEEFI(), "ipxe.efi"), ReadsNFS: true, SANBoot: true,
		Secure: &SecureFirmware{Code: images.OVMFSecureCode(), Vars: images.OVMFVarsMS(), SMM: true, Signs: true},
		IPv6:   true, FwCfg6: [][2]string{{"opt/org.tianocore/IPv4PXESupport", "no"}},
		Cost: Cost{Boot: 15.5, Loader: 9, NoDHCP: 18},
	},
	{
		Profile: qemu.Profile{Arch: "amd64", Firmware: "ovmf-http", Machine: "q35", Load: qemu.LoadPflash, FwCfg: noPXE,
			Description: "OVMF's own UEFI HTTP boot: DHCP option 60 HTTPClient and a URL, one Unified Kernel Image (systemd stub, kernel, archive, command line) over HTTP, no loader"},
		Code: images.OVMFCode(), Vars: images.OVMFVars(), UEFI: true, Stub: images.StubX64(),
		Secure: &SecureFirmware{Code: images.OVMFSecureCode(), Vars: images.OVMFVarsMS(), SMM: true, Signs: true},
		DHCP:   []DHCPRule{httpBoot(archHTTPx64, "http://{server}/{guest}/"+ukiName)}, loader: ukiLoader(images.StubX64()), IPv6: true, FwCfg6: httpV6, Passes6: pxeV6GivesUp,
		Cost: Cost{Boot: 17, Loader: 9, NoDHCP: 18},
	},
	{
		Profile: qemu.Profile{Arch: "amd64", Firmware: "ovmf-shim", Machine: "q35", Load: qemu.LoadPflash,
			Description: "OVMF with Secure Boot (Microsoft's keys enrolled): PXE option 93 = 7 picks Debian's signed shim, which fetches Debian's signed GRUB netboot image beside it; grub.cfg, the kernel (verified through shim) and the archive (verified by nobody) over TFTP"},
		Code: images.OVMFCode(), Vars: images.OVMFVars(), UEFI: true,
		Secure: &SecureFirmware{Code: images.OVMFSecureCode(), Vars: images.OVMFVarsMS(), SMM: true, Default: true},
		DHCP:   []DHCPRule{pxeX64("{guest}/" + shimX64.shimName)}, loader: shimLoader(shimX64), LoaderConfig: ConfigGRUB,
		Cost: Cost{Boot: 30, Loader: 12, NoDHCP: 18},
	},
	{
		Profile: qemu.Profile{Arch: "arm64", Firmware: "uboot", Machine: "virt", Load: qemu.LoadBIOS,
			Description: "U-Boot: DHCP, boot script and pxelinux config over TFTP, kernel and archive over TFTP"},
		Code: images.UBoot(), env: ubootEnv,
		DHCP: []DHCPRule{ubootScript}, loader: ubootLoader, LoaderConfig: ConfigPXELinux, ReadsNFS: true, UserNet: "boot.scr.uimg", NICs: []string{"e1000"},
		NoIPv6: "Debian 12's U-Boot (2023.01) is built without IPv6; its network stack gained IPv6 in 2023.04",
		Cost:   Cost{Boot: 5, Loader: 1, NoDHCP: 6},
	},
	{
		Profile: qemu.Profile{Arch: "arm64", Firmware: "aavmf-grub", Machine: "virt", Load: qemu.LoadBIOS,
			Description: "AAVMF (UEFI) PXE: option 93 = 11 picks a GRUB netboot image over TFTP, grub.cfg, kernel (gzip-compressed; GRUB decompresses) over HTTP"},
		Code: images.AAVMF(), UEFI: true,
		DHCP: []DHCPRule{pxeArm64("{guest}/grubnetaa64.efi")}, loader: grubLoader, LoaderConfig: ConfigGRUB, Verifies: true, GzipKernel: true,
		// The truncated kernel over GRUB's HTTP, then 5 s of grace.
		Cost: Cost{Boot: 22, Loader: 10, NoDHCP: 18, Truncated: 26},
	},
	{
		Profile: qemu.Profile{Arch: "arm64", Firmware: "aavmf-ipxe", Machine: "virt", Load: qemu.LoadBIOS,
			Description: "AAVMF (UEFI) PXE: option 93 = 11 picks Debian 13's ipxe-arm64.efi over TFTP, then the iPXE script as on amd64"},
		Code: images.AAVMF(), UEFI: true,
		DHCP: []DHCPRule{ipxeScript, pxeArm64("ipxe-arm64.efi")}, LoaderConfig: ConfigIPXE, loader: ipxeChainload(images.IPXEArm64(), "ipxe-arm64.efi"), ReadsNFS: true, SANBoot: true,
		Secure: &SecureFirmware{Code: images.AAVMFCode(), Vars: images.AAVMFVarsMS(), Signs: true},
		IPv6:   true, FwCfg6: [][2]string{{"opt/org.tianocore/IPv4PXESupport", "no"}},
		Cost: Cost{Boot: 19, Loader: 11, NoDHCP: 18},
	},
	{
		Profile: qemu.Profile{Arch: "arm64", Firmware: "aavmf-http", Machine: "virt", Load: qemu.LoadPflash, FwCfg: noPXE,
			Description: "AAVMF's own UEFI HTTP boot: as ovmf-http, on arm64"},
		Code: images.AAVMFCode(), Vars: images.AAVMFVars(), UEFI: true, Stub: images.StubArm64(),
		Secure: &SecureFirmware{Code: images.AAVMFCode(), Vars: images.AAVMFVarsMS(), Signs: true},
		DHCP:   []DHCPRule{httpBoot(archHTTPArm64, "http://{server}/{guest}/"+ukiName)}, loader: ukiLoader(images.StubArm64()),
		// AAVMF has no switch to leave IPv4 out (IPv4Support is OVMF's
		// alone): the boot order in its variables puts IPv6 first.
		IPv6: true, FwCfg6: httpV6, Passes6: pxeV6GivesUp, vars6: netBootV6First,
		Cost: Cost{Boot: 18, Loader: 10, NoDHCP: 18},
	},
	{
		Profile: qemu.Profile{Arch: "arm64", Firmware: "aavmf-shim", Machine: "virt", Load: qemu.LoadPflash,
			Description: "AAVMF with Secure Boot (Microsoft's keys enrolled): as ovmf-shim, on arm64"},
		Code: images.AAVMFCode(), Vars: images.AAVMFVars(), UEFI: true,
		Secure: &SecureFirmware{Code: images.AAVMFCode(), Vars: images.AAVMFVarsMS(), Default: true},
		DHCP:   []DHCPRule{pxeArm64("{guest}/" + shimArm64.shimName)}, loader: shimLoader(shimArm64), LoaderConfig: ConfigGRUB,
		Cost: Cost{Boot: 30, Loader: 14, NoDHCP: 18},
	},
	{
		Profile: qemu.Profile{Arch: "riscv64", Firmware: "uboot", Machine: "virt", Load: qemu.LoadBIOS,
			Description: "OpenSBI, then U-Boot in supervisor mode (Debian 13's): DHCP, boot script and pxelinux config over TFTP, kernel and archive over TFTP"},
		Code: images.OpenSBI(), Payload: images.UBootRiscv64(),
		// (Debian 13's U-Boot for it has no nfs command: no loader-nfs.)
		DHCP: []DHCPRule{ubootScript}, loader: ubootLoader, LoaderConfig: ConfigPXELinux, UserNet: "boot.scr.uimg", NICs: []string{"e1000"},
		NoIPv6: "Debian 13's U-Boot (2025.01) for qemu-riscv64_smode is built without CONFIG_IPV6 (no ip6addr variable, no tftpboot -ipv6)",
		Cost:   Cost{Boot: 30, Loader: 10, NoDHCP: 10},
	},
	{
		Profile: qemu.Profile{Arch: "amd64", Firmware: qemu.Direct, Machine: "pc", Load: qemu.LoadKernel,
			Description: "QEMU -kernel/-initrd with the same archive and network (baseline)"},
		IPv6: true,
		Cost: Cost{Boot: 7, NoDHCP: 6},
	},
	{
		Profile: qemu.Profile{Arch: "arm64", Firmware: qemu.Direct, Machine: "virt", Load: qemu.LoadKernel,
			Description: "QEMU -kernel/-initrd with the same archive and network (baseline)"},
		IPv6: true,
		Cost: Cost{Boot: 4, NoDHCP: 6},
	},
	{
		Profile: qemu.Profile{Arch: "riscv64", Firmware: qemu.Direct, Machine: "virt", Load: qemu.LoadKernel,
			Description: "QEMU -kernel/-initrd with the same archive and network (baseline)"},
		IPv6: true,
		Cost: Cost{Boot: 12, NoDHCP: 6},
	},
}

// AllChains lists every chain, in chainTable's order.
func AllChains() []Chain { return append([]Chain(nil), chainTable...) }

// SelectChains lists the chains whose architecture is in arches and whose
// firmware is in fws (comma-separated; empty or "all": any).
func SelectChains(arches, fws string) []Chain {
	archSet, fwSet := list(arches), list(fws)
	var out []Chain
	for _, c := range chainTable {
		if (archSet == nil || archSet[c.Arch]) && (fwSet == nil || fwSet[c.Firmware]) {
			out = append(out, c)
		}
	}
	return out
}

// LookupChain finds the chain of arch and firmware.
func LookupChain(arch, firmware string) (Chain, error) {
	var names []string
	for _, c := range chainTable {
		if c.Arch == arch && c.Firmware == firmware {
			return c, nil
		}
		if c.Arch == arch {
			names = append(names, c.Firmware)
		}
	}
	if names == nil {
		return Chain{}, fmt.Errorf("unknown architecture %q (%s)", arch, strings.Join(images.Arches(), ", "))
	}
	sort.Strings(names)
	return Chain{}, fmt.Errorf("firmware %q is not available for %s (have: %s)", firmware, arch, strings.Join(names, ", "))
}

// loaderChains are the chains of arch with a network boot, in table order,
// but for those that need Secure Boot firmware to boot at all (the shim
// chains: a guest ready for any loader is offered iPXE or GRUB by the
// chains before them, so shim's files would only be written for nobody).
func loaderChains(arch string) []Chain {
	var out []Chain
	for _, c := range chainTable {
		if c.Arch == arch && c.Firmware != qemu.Direct && !(c.Secure != nil && c.Secure.Default) {
			out = append(out, c)
		}
	}
	return out
}

// VerifyingChains names the chains whose loader checks signatures.
func VerifyingChains() []string { return chainNames(func(c Chain) bool { return c.Verifies }) }

// UserNetChains names the chains that can boot on QEMU's user-mode network.
func UserNetChains() []string { return chainNames(func(c Chain) bool { return c.UserNet != "" }) }

// IPv6Chains names the chains that can boot over IPv6 (Spec.Family).
func IPv6Chains() []string { return chainNames(func(c Chain) bool { return c.IPv6 }) }

// SecureBootChains names the chains that can boot with UEFI Secure Boot.
func SecureBootChains() []string { return chainNames(func(c Chain) bool { return c.Secure != nil }) }

// SANBootChains names the chains whose loader can SAN-boot (RootSANBoot).
func SANBootChains() []string { return chainNames(func(c Chain) bool { return c.SANBoot }) }

// Drives reports whether the chain's firmware can boot from a NIC of the
// model: virtio always; when the chain boots through the NIC's ROM, any
// model QEMU has an iPXE ROM for (under UEFI, one with an EFI driver); any
// at all for a direct boot (no firmware) or with the user's own ROM or
// firmware (romFile: they bring the driver); else the models in NICs.
func (c Chain) Drives(nic string, romFile bool) error {
	m, err := qemu.LookupNIC(nic)
	if err != nil {
		return err
	}
	switch {
	case m.Name == qemu.VirtioNIC, c.Load == qemu.LoadKernel, romFile, slices.Contains(c.NICs, m.Name):
		return nil
	case c.NICROM:
		rom, err := qemu.DefaultROM(c.Arch, c.Machine, m)
		switch {
		case err != nil:
			return err
		case rom != "" && (qemu.ROMHasEFI(rom) || !c.UEFI):
			return nil
		case rom != "":
			return fmt.Errorf("NIC %s: QEMU's ROM for it (%s) holds no EFI driver, so %s's UEFI firmware cannot boot from it; seabios-ipxe can, or bring an EFI ROM with --nic-rom", m.Name, rom, c.Name())
		}
	}
	return fmt.Errorf("NIC %s: %s's firmware has no driver for it (it drives %s); chains that boot through the NIC's iPXE ROM (%s) and direct boots take any model, or bring the NIC's ROM with --nic-rom, or firmware of your own that drives it",
		m.Name, c.Name(), strings.Join(append([]string{qemu.VirtioNIC}, c.NICs...), ", "), strings.Join(chainNames(func(c Chain) bool { return c.NICROM }), ", "))
}

// Boots reports whether the chain can boot a guest with root: any but a SAN
// boot, which needs a loader that can (SANBoot).
func (c Chain) Boots(root string) bool { return root != RootSANBoot || c.SANBoot }

func chainNames(keep func(Chain) bool) []string {
	var out []string
	for _, c := range chainTable {
		if keep(c) {
			out = append(out, c.Name())
		}
	}
	return out
}

func list(v string) map[string]bool {
	v = strings.TrimSpace(v)
	if v == "" || v == "all" {
		return nil
	}
	m := map[string]bool{}
	for _, s := range strings.Split(v, ",") {
		m[strings.TrimSpace(s)] = true
	}
	return m
}

// fwCfg is the firmware's switches base for a boot over family (Spec.Family),
// with FwCfg6 over them for IPv6.
func (c Chain) fwCfg(base [][2]string, family string) [][2]string {
	if family != dhcp.V6 || len(c.FwCfg6) == 0 {
		return base
	}
	out := slices.Clone(base)
	for _, kv := range c.FwCfg6 {
		i := slices.IndexFunc(out, func(o [2]string) bool { return o[0] == kv[0] })
		if i >= 0 {
			out[i] = kv
		} else {
			out = append(out, kv)
		}
	}
	return out
}
