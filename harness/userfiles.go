package harness

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"nbh.dev/nbh/harness/fwcheck"
	"nbh.dev/nbh/harness/qemu"
)

// Flash rules QEMU 7.2 holds a firmware file to: virt's two pflash banks
// are 64 MiB each and a pflash file must be exactly that (a -bios image
// fits in one); on pc and q35 the pflash files (code and variables
// together) end at 4 GiB, at most 8 MiB, each a whole number of 4 KiB
// sectors; a pc -bios image is whole 64 KiB blocks, at most 16 MiB.
const (
	virtFlash = 64 << 20
	pcFlash   = 8 << 20
	pcBIOS    = 16 << 20
)

// sizeRule checks a firmware file's size against one of those rules.
func sizeRule(what, path string, exact, max, align int64) (int64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", what, err)
	}
	n := fi.Size()
	switch {
	case exact > 0 && n != exact:
		return n, fmt.Errorf("%s %s: %d bytes; QEMU's virt machine takes a flash file of exactly %d (pad it: truncate -s %dM %s)", what, path, n, exact, exact>>20, path)
	case max > 0 && n > max:
		return n, fmt.Errorf("%s %s: %d bytes, more than the %d the machine's flash holds", what, path, n, max)
	case align > 0 && n%align != 0:
		return n, fmt.Errorf("%s %s: %d bytes, not a whole number of %d KiB blocks, as QEMU wants it", what, path, n, align>>10)
	}
	return n, nil
}

// loaderName is the guest's own loader binary's name in its folder on the
// boot server ("" without one).
func (g *Guest) loaderName() string {
	if g.spec.Loader == "" {
		return ""
	}
	return filepath.Base(g.spec.Loader)
}

// servedLoader is the loader binary DHCP names in the guest's folder: the
// user's own, or under Secure Boot nbh's iPXE as the lab signed it for the
// guest (ipxeChainload); "" for the chain's own name.
func (g *Guest) servedLoader() string {
	if n := g.loaderName(); n != "" {
		return n
	}
	if g.chain.signsImage() && g.chain.Stub.Path == "" {
		for _, r := range g.chain.DHCP {
			if r.Loader && !strings.HasPrefix(r.File, "{guest}/") {
				return path.Base(r.File)
			}
		}
	}
	return ""
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
	virt := c.Machine == "virt"
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
		if err := fwcheck.FirmwareCode("firmware code", s.FirmwareCode, 0); err != nil {
			return err
		}
		if err := c.flashSize("firmware code", s.FirmwareCode, virt); err != nil {
			return err
		}
	}
	if s.FirmwareVars != "" {
		if c.Load != qemu.LoadPflash {
			return fmt.Errorf("firmware vars: %s runs its firmware without a variable store flash (chains with one: %s)", c.Name(), strings.Join(chainNames(func(c Chain) bool { return c.Load == qemu.LoadPflash }), ", "))
		}
		if err := fwcheck.FirmwareVars("firmware vars", s.FirmwareVars, 0); err != nil {
			return err
		}
		if err := c.flashSize("firmware vars", s.FirmwareVars, virt); err != nil {
			return err
		}
		if !virt && s.FirmwareCode != "" {
			code, _ := os.Stat(s.FirmwareCode)
			vars, _ := os.Stat(s.FirmwareVars)
			if code.Size()+vars.Size() > pcFlash {
				return fmt.Errorf("firmware code and vars: %d bytes together, more than the %d of %s's flash", code.Size()+vars.Size(), pcFlash, c.Machine)
			}
		}
	}
	if s.BIOS != "" {
		if c.UEFI || c.Load == qemu.LoadKernel {
			return fmt.Errorf("bios: %s boots no BIOS of its own (--bios is SeaBIOS for seabios-ipxe, U-Boot for uboot; a UEFI build goes in with --firmware-code)", c.Name())
		}
		if err := fwcheck.Flash("bios", s.BIOS, 0); err != nil {
			return err
		}
		if err := c.flashSize("bios", s.BIOS, virt); err != nil {
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

// flashSize checks a firmware file against the flash it goes into: pflash
// or -bios, on virt or pc/q35.
func (c Chain) flashSize(what, path string, virt bool) error {
	var err error
	switch {
	case c.Load == qemu.LoadPflash && virt:
		_, err = sizeRule(what, path, virtFlash, 0, 0)
	case c.Load == qemu.LoadPflash:
		_, err = sizeRule(what, path, 0, pcFlash, 4<<10)
	case virt: // -bios on virt
		_, err = sizeRule(what, path, 0, virtFlash, 0)
	default: // -bios on pc
		_, err = sizeRule(what, path, 0, pcBIOS, 64<<10)
	}
	return err
}
