package harness

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"nbh.dev/nbh/harness/fwcheck"
	"nbh.dev/nbh/harness/qemu"
)

// Flash limits QEMU sets: virt's two flash banks are 64 MiB each; on pc
// and q35 the firmware flash (code and variables together) ends at 4 GiB
// and QEMU allows 8 MiB of it, and a -bios image 16 MiB.
const (
	virtFlash = 64 << 20
	pcFlash   = 8 << 20
	pcBIOS    = 16 << 20
)

// loaderName is the guest's own loader binary's name in its folder on the
// boot server ("" without one).
func (g *Guest) loaderName() string {
	if g.spec.Loader == "" {
		return ""
	}
	return filepath.Base(g.spec.Loader)
}

// takesLoader reports whether DHCP hands the chain's firmware a loader
// binary that a user's own can replace.
func (c Chain) takesLoader() bool {
	return slices.ContainsFunc(c.DHCP, func(r DHCPRule) bool { return r.Loader })
}

// CheckUserFiles checks the user's own loader, firmware and ROM files
// (Spec.Loader, FirmwareCode, FirmwareVars, BIOS, NICROM) against the
// chain, before anything is built or started.
func (c Chain) CheckUserFiles(s Spec) error {
	flash, bios := int64(pcFlash), int64(pcBIOS)
	if c.Machine == "virt" {
		flash, bios = virtFlash, virtFlash
	}
	if s.Loader != "" {
		if !c.takesLoader() {
			return fmt.Errorf("loader: %s's firmware is handed no loader binary (chains that are: %s)", c.Name(), strings.Join(chainNames(Chain.takesLoader), ", "))
		}
		if err := fwcheck.EFIBinary("loader", s.Loader, c.Arch); err != nil {
			return err
		}
	}
	if s.FirmwareCode != "" {
		if !c.UEFI {
			return fmt.Errorf("firmware code: %s's firmware is not UEFI (its own build goes in with --bios)", c.Name())
		}
		max := flash
		if c.Load == qemu.LoadBIOS {
			max = bios
		}
		if err := fwcheck.FirmwareCode("firmware code", s.FirmwareCode, max); err != nil {
			return err
		}
	}
	if s.FirmwareVars != "" {
		if c.Load != qemu.LoadPflash {
			return fmt.Errorf("firmware vars: %s runs its firmware without a variable store flash (chains with one: %s)", c.Name(), strings.Join(chainNames(func(c Chain) bool { return c.Load == qemu.LoadPflash }), ", "))
		}
		if err := fwcheck.FirmwareVars("firmware vars", s.FirmwareVars, flash); err != nil {
			return err
		}
	}
	if s.BIOS != "" {
		if c.UEFI || c.Load == qemu.LoadKernel {
			return fmt.Errorf("bios: %s boots no BIOS of its own (--bios is SeaBIOS for seabios-ipxe, U-Boot for uboot; a UEFI build goes in with --firmware-code)", c.Name())
		}
		if err := fwcheck.Flash("bios", s.BIOS, bios); err != nil {
			return err
		}
	}
	if s.NICROM != "" {
		if s.UserNet {
			return fmt.Errorf("nic rom: not on QEMU's user network")
		}
		if err := fwcheck.OptionROM("nic rom", s.NICROM); err != nil {
			return err
		}
	}
	return nil
}
