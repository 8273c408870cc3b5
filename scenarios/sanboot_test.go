package scenarios

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/images/stock"
)

// TestSANBoot SAN-boots every chain that can (iPXE's sanboot from the lab's
// iSCSI target, with CHAP) twice under one name: the firmware boots the
// Unified Kernel Image from the disk's ESP, the kernel's init reads the
// iBFT, logs in again and mounts the root partition of the same disk, and
// the second boot finds what the first wrote there. The iSCSI service sees
// two logins a boot: the loader's, then the root's.
func TestSANBoot(t *testing.T) {
	needGuests(t)
	t.Parallel()
	for _, p := range nbhtest.Chains() {
		if !p.SANBoot {
			continue
		}
		t.Run(p.Name(), func(t *testing.T) {
			guestTest(t)
			lab := nbhtest.NewLab(t)
			for boot := 1; boot <= 2; boot++ {
				g, err := lab.Boot(context.Background(), harness.Spec{Name: "box", Arch: p.Arch, Firmware: p.Firmware,
					Root: harness.RootSANBoot, CHAP: true, Artifacts: nbhtest.Artifacts(t, fmt.Sprintf("boot%d", boot))})
				assert.NilError(t, err)
				v := g.Wait(context.Background())
				assert.Assert(t, v.OK, "boot %d: %v\nlast console lines:\n%s", boot, v.Err(), strings.Join(v.Tail, "\n"))
				assert.Check(t, is.Contains(v.Line, "fstype=ext4 source=/dev/sda2"))
				assert.Check(t, is.Contains(v.Line, fmt.Sprintf("boots=%d ", boot)), "the root's write did not survive the reboot")
				assert.Check(t, is.Contains(g.Console(), "nbh-init: iBFT: initiator iqn.2026-11.dev.nbh:box"), "the init did not read the iBFT")
				assert.Check(t, is.Contains(g.Console(), "Booting from SAN device"))
				var logins []string
				for _, e := range lab.Timeline().Events("box") {
					if e.Source == "iscsi" && e.Kind == "login" && e.Time.After(g.Start) {
						chap, _ := e.Detail["chap"].(bool)
						logins = append(logins, fmt.Sprintf("%s chap=%v", e.Stage, chap))
					}
				}
				assert.Check(t, is.DeepEqual(logins, []string{"loader chap=true", "root chap=true"}))
				assert.Check(t, is.DeepEqual(stagesOf(g.Spans()), []timeline.Stage{timeline.Firmware, timeline.DHCP, timeline.Loader,
					timeline.Kernel, timeline.Init, timeline.Root, timeline.Marker}))
				assert.NilError(t, g.Close())
			}
		})
	}
}

// TestSANBootStockInitramfs SAN-boots with the archive Debian's
// initramfs-tools makes with open-iscsi's hook: iscsi_auto brings the
// network up from the iBFT and logs in with iscsistart, and the root is
// the disk's second partition.
func TestSANBootStockInitramfs(t *testing.T) {
	lab, v := sanbootStock(t, stock.InitramfsISCSI)
	assert.Assert(t, v.OK, "%v\nlast console lines:\n%s", v.Err(), strings.Join(v.Tail, "\n"))
	assert.Check(t, is.Contains(v.Line, "fstype=ext4 source=/dev/sda2"))
	var logins int
	for _, e := range lab.Timeline().Events("g1") {
		if e.Source == "iscsi" && e.Kind == "login" && e.Stage == timeline.Root {
			logins++
			assert.Check(t, is.Equal(e.Detail["initiator"], "iqn.2026-11.dev.nbh:g1"), "iscsistart did not log in as the iBFT's initiator")
		}
	}
	assert.Check(t, logins == 1, "%d root logins", logins)
}

// TestSANBootOversizedArchive: Debian 12's iPXE cuts a SAN read of more
// than 65535 blocks to READ(10)'s 16 bits. dracut's archive (not host-only)
// makes a UKI over 32 MiB: the kernel finds its archive cut short, and the
// verdict carries the target's evidence of why.
func TestSANBootOversizedArchive(t *testing.T) {
	_, v := sanbootStock(t, stock.Dracut)
	assert.Assert(t, !v.OK, "a dracut UKI booted from the SAN disk: %s", v.Line)
	assert.Equal(t, v.Reason, failure.CorruptArchive, "%v", v.Err())
	assert.Check(t, is.Contains(v.Detail, "last iscsi event: read10-overflow READ(10) of"))
}

// sanbootStock SAN-boots amd64/ovmf-ipxe with the archive tool makes (a
// UKI on the disk's ESP) and returns the lab and the verdict.
func sanbootStock(t *testing.T, tool string) (*harness.Lab, harness.Verdict) {
	guestTest(t)
	if !selected("amd64", "ovmf-ipxe") {
		t.Skip("amd64/ovmf-ipxe not selected")
	}
	lab := nbhtest.NewLab(t)
	a, err := stock.Build(context.Background(), lab.Cache(), tool, "amd64", testLog{t})
	if errors.Is(err, stock.ErrForeignArch) {
		t.Skip(err)
	}
	assert.NilError(t, err)
	g, err := lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: "ovmf-ipxe", Root: harness.RootSANBoot,
		Initrd: a.Path, Artifacts: nbhtest.Artifacts(t, "g1")})
	assert.NilError(t, err)
	return lab, g.Wait(context.Background())
}

// TestSANBootFaults: a SAN boot's login faults end at the loader, with
// iPXE's words and the target's reason; a disk booted without its iBFT
// ends at the root, where the init finds no table to mount from.
func TestSANBootFaults(t *testing.T) {
	needGuests(t)
	t.Parallel()
	cases := []struct {
		arch, firmware, fault string
		want                  failure.Reason
		stage                 timeline.Stage
		line                  string
	}{
		{"amd64", "ovmf-ipxe", "san-wrong-iqn", failure.SANBoot, timeline.Loader, "Could not open SAN device"},
		{"amd64", "ovmf-ipxe", "san-bad-chap", failure.SANBoot, timeline.Loader, "Could not open SAN device"},
		{"amd64", "ovmf-ipxe", "san-no-ibft", failure.RootMount, timeline.Root, "no iBFT"},
		{"arm64", "aavmf-ipxe", "san-bad-chap", failure.SANBoot, timeline.Loader, "Could not open SAN device"},
	}
	for _, c := range cases {
		t.Run(c.arch+"/"+c.firmware+"/"+c.fault, func(t *testing.T) {
			guestTest(t)
			if !selected(c.arch, c.firmware) {
				t.Skipf("%s/%s not selected", c.arch, c.firmware)
			}
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(context.Background(), harness.Spec{Arch: c.arch, Firmware: c.firmware, Root: harness.RootSANBoot,
				Faults: []harness.Fault{fault(t, c.fault)}, Artifacts: nbhtest.Artifacts(t, "g1")})
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			assert.Assert(t, !v.OK, "booted despite the fault: %s", v.Line)
			assert.Equal(t, v.Reason, c.want, "%v\nlast console lines:\n%s", v.Err(), strings.Join(v.Tail, "\n"))
			assert.Check(t, is.Equal(v.Stage, c.stage))
			assert.Check(t, is.Contains(v.Line, c.line))
		})
	}
}

// TestSANBootRefused: a SAN boot needs a loader that can, and a clear
// network (no loader can do ESP).
func TestSANBootRefused(t *testing.T) {
	lab := nbhtest.NewLab(t)
	_, err := lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: "ovmf-http", Root: harness.RootSANBoot})
	assert.ErrorContains(t, err, "cannot SAN-boot; only amd64/ovmf-ipxe")
	_, err = lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: "ovmf-ipxe", Root: harness.RootSANBoot,
		Faults: []harness.Fault{fault(t, "truncated-archive")}})
	assert.ErrorContains(t, err, "does not apply")
}
