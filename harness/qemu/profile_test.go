package qemu

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	"gotest.tools/v3/golden"
)

// TestArgs pins each chain's QEMU command line (go test -update rewrites
// testdata/*.golden after a deliberate change).
func TestArgs(t *testing.T) {
	dir := t.TempDir()
	vars := filepath.Join(dir, "vars.fd")
	assert.NilError(t, os.WriteFile(vars, []byte("vars"), 0o644))
	files := Files{OVMFCode: "/fw/OVMF_CODE.fd", OVMFVars: vars, AAVMF: "/fw/QEMU_EFI.fd", UBoot: "/fw/u-boot.bin", UBootEnv: "/fw/env.fd"}
	for _, p := range Profiles {
		t.Run(p.Name(), func(t *testing.T) {
			a, err := Args(Config{Profile: p, Accel: Accel{Name: "tcg"}, MAC: "52:54:00:4e:42:01", Files: files,
				Kernel: "/k/vmlinuz", Initrd: "/k/initrd.img", Append: "console=ttyS0", Dir: dir, QMP: "/q/qmp.sock", NetFD: 3})
			assert.NilError(t, err)
			got := strings.ReplaceAll(strings.Join(a, "\n"), dir, "$DIR") + "\n"
			golden.Assert(t, got, p.Arch+"-"+p.Firmware+".golden")
		})
	}
}

func TestLookup(t *testing.T) {
	_, err := Lookup("amd64", "uboot")
	assert.ErrorContains(t, err, "not available for amd64 (have: direct, ovmf-ipxe, ovmf-pxe, seabios-ipxe)")
	_, err = Lookup("riscv64", "direct")
	assert.ErrorContains(t, err, "unknown architecture")
	p, err := Lookup("arm64", "aavmf-grub")
	assert.NilError(t, err)
	assert.Equal(t, p.Name(), "arm64/aavmf-grub")
}

func TestKVMOnlyForTheHostArch(t *testing.T) {
	other := "arm64"
	if hostArch() == "arm64" {
		other = "amd64"
	}
	assert.Equal(t, Probe(other).Name, "tcg")
	t.Setenv("NBH_ACCEL", "tcg")
	assert.Equal(t, Probe(hostArch()).Name, "tcg")
}

// The KVM probe's guests really run and print: here under TCG (the probe
// itself asks for KVM), so a probe that passes has seen guest code run.
func TestProbeGuestsPrint(t *testing.T) {
	if testing.Short() {
		t.Skip("runs QEMU; skipped with -short")
	}
	for _, arch := range []string{"amd64", "arm64"} {
		ran, why := probeGuest(arch, Accel{Name: "tcg"}, 20*time.Second)
		assert.Assert(t, ran, "%s: %s", arch, why)
	}
	// Silence until the limit is no success.
	ran, why := probeGuest("amd64", Accel{Name: "tcg"}, time.Millisecond)
	assert.Assert(t, !ran)
	assert.Assert(t, strings.Contains(why, "no guest output within"), why)
}
