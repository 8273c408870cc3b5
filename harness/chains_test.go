package harness

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gotest.tools/v3/assert"
	"gotest.tools/v3/golden"

	"nbh.dev/nbh/harness/dhcp"
	"nbh.dev/nbh/harness/qemu"
)

// TestQEMUArgs pins each chain's QEMU command line (go test -update
// rewrites testdata/qemu-args/*.golden after a deliberate change).
func TestQEMUArgs(t *testing.T) {
	dir := t.TempDir()
	vars := filepath.Join(dir, "vars.fd")
	assert.NilError(t, os.WriteFile(vars, []byte("vars"), 0o644))
	var chains []Chain
	for _, c := range AllChains() {
		chains = append(chains, c)
		if c.Secure != nil && !c.SecureBoot {
			// And the same chain with Secure Boot on.
			sb, err := c.WithSecureBoot(SecureBootOn)
			assert.NilError(t, err)
			chains = append(chains, sb)
		}
	}
	for _, c := range chains {
		name := c.Arch + "-" + c.Firmware
		code, varsFile := c.Code, c.Vars
		if c.SecureBoot {
			name, code, varsFile = name+"-secure-boot", c.Secure.Code, c.Secure.Vars
		}
		t.Run(name, func(t *testing.T) {
			var files qemu.Files
			if code.Path != "" {
				files.Code = "/fw/" + filepath.Base(code.Path)
			}
			if varsFile.Path != "" {
				files.Vars = vars
			}
			if c.env != nil {
				files.Env = "/fw/env.fd"
			}
			if c.Payload.Path != "" {
				files.Payload = "/fw/" + filepath.Base(c.Payload.Path)
			}
			a, err := qemu.Args(qemu.Config{Profile: c.Profile, Accel: qemu.Accel{Name: "tcg"}, MAC: "52:54:00:4e:42:01", Files: files,
				Kernel: "/k/vmlinuz", Initrd: "/k/initrd.img", Append: "console=ttyS0", Dir: dir, QMP: "/q/qmp.sock", NetFD: 3})
			assert.NilError(t, err)
			got := strings.ReplaceAll(strings.Join(a, "\n"), dir, "$DIR") + "\n"
			golden.Assert(t, got, filepath.Join("qemu-args", name+".golden"))
		})
	}
}

func TestLookupChain(t *testing.T) {
	_, err := LookupChain("amd64", "uboot")
	assert.ErrorContains(t, err, "not available for amd64 (have: direct, ovmf-http, ovmf-ipxe, ovmf-pxe, ovmf-shim, seabios-ipxe)")
	_, err = LookupChain("loong64", "direct")
	assert.ErrorContains(t, err, "unknown architecture")
	c, err := LookupChain("arm64", "aavmf-grub")
	assert.NilError(t, err)
	assert.Equal(t, c.Name(), "arm64/aavmf-grub")
}

// Every chain is whole: a QEMU machine, firmware images for a firmware
// that QEMU does not bring, DHCP rules and loader files for a network
// boot, a cost for the matrix; and no two chains of an arch share a name.
func TestChainTableIsWhole(t *testing.T) {
	seen := map[string]bool{}
	for _, c := range AllChains() {
		assert.Assert(t, !seen[c.Name()], "%s declared twice", c.Name())
		seen[c.Name()] = true
		assert.Assert(t, c.Machine != "" && c.Description != "", c.Name())
		assert.Assert(t, c.Cost.Boot > 0, "%s has no cost", c.Name())
		needsCode := c.Load == qemu.LoadPflash || c.Load == qemu.LoadBIOS
		assert.Equal(t, c.Code.Path != "", needsCode, "%s: firmware image", c.Name())
		assert.Equal(t, c.Vars.Path != "", c.Load == qemu.LoadPflash, "%s: variables", c.Name())
		if c.Firmware == qemu.Direct {
			assert.Equal(t, c.Load, qemu.LoadKernel)
			assert.Assert(t, len(c.DHCP) == 0 && c.loader == nil, c.Name())
			continue
		}
		assert.Assert(t, len(c.DHCP) > 0, "%s: no DHCP rule", c.Name())
		assert.Assert(t, c.loader != nil, "%s: no loader files", c.Name())
		assert.Assert(t, c.Cost.Loader > 0 && c.Cost.NoDHCP > 0, "%s: no loader or no-dhcp cost", c.Name())
	}
}

// The DHCP rules pick the boot file by what the client says it is.
func TestChainDHCPRules(t *testing.T) {
	answer := func(arch, fw string, c dhcp.Client) string {
		ch, err := LookupChain(arch, fw)
		assert.NilError(t, err)
		for _, r := range ch.DHCP {
			if r.Match(c) {
				return r.answer("10.0.2.2", "g1", "").File
			}
		}
		return ""
	}
	ipxe := dhcp.Client{Arch: dhcp.ArchEFIx64, IPXE: true, VendorClass: "PXEClient:Arch:00007"}
	pxe := dhcp.Client{Arch: dhcp.ArchEFIx64, VendorClass: "PXEClient:Arch:00007:UNDI:003000"}
	assert.Equal(t, answer("amd64", "ovmf-pxe", pxe), "ipxe.efi")
	assert.Equal(t, answer("amd64", "ovmf-pxe", ipxe), "http://10.0.2.2/g1/boot.ipxe")
	assert.Equal(t, answer("amd64", "seabios-ipxe", pxe), "", "no iPXE binary for a chain whose iPXE is a ROM")
	arm := dhcp.Client{Arch: dhcp.ArchEFIArm64, VendorClass: "PXEClient:Arch:00011:UNDI:003000"}
	assert.Equal(t, answer("arm64", "aavmf-grub", arm), "g1/grubnetaa64.efi")
	assert.Equal(t, answer("arm64", "aavmf-ipxe", arm), "ipxe-arm64.efi")
	assert.Equal(t, answer("arm64", "aavmf-ipxe", dhcp.Client{Arch: dhcp.ArchEFIArm64, IPXE: true}), "http://10.0.2.2/g1/boot.ipxe")
	http := dhcp.Client{Arch: 16, VendorClass: "HTTPClient:Arch:00016:UNDI:003001"}
	assert.Equal(t, answer("amd64", "ovmf-http", http), "http://10.0.2.2/g1/boot.efi")
	assert.Equal(t, answer("amd64", "ovmf-pxe", http), "", "a PXE chain does not answer HTTP boot")
	assert.Equal(t, answer("amd64", "ovmf-http", pxe), "", "an HTTP chain does not answer PXE")
	assert.Equal(t, answer("arm64", "uboot", dhcp.Client{Arch: dhcp.ArchUBootA64, VendorClass: "U-Boot.armv8"}), "boot.scr.uimg")
}
