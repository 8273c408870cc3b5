// Package scenarios holds the go test scenarios that boot real firmware,
// loaders and Debian kernels in QEMU against the lab. They are the only slow
// tests; -short skips them. $NBH_ARCH and $NBH_FIRMWARE narrow the chains
// (comma-separated), $NBH_ARTIFACTS keeps every guest's console.log,
// timeline.jsonl and network.pcapng.
package scenarios

import (
	"context"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/internal/sched"
)

func needGuests(t testing.TB) {
	if testing.Short() {
		t.Skip("boots guests in QEMU; skipped with -short")
	}
}

// guestTest marks a test that boots guests: skipped with -short, run in
// parallel with the others while it holds one of the shared scheduler's
// slots (sched.Jobs, the same bound nbh matrix -j uses; $NBH_JOBS
// sets it), so the test binary never boots more guests than the machine
// carries. The Makefile runs go test with a high -parallel: the slots are
// the bound.
func guestTest(t *testing.T) {
	t.Helper()
	needGuests(t)
	t.Parallel()
	release, err := sched.Shared().Acquire(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
}

// fault is nbh's fault of that name.
func fault(t testing.TB, name string) harness.Fault {
	t.Helper()
	f, err := harness.LookupFault(name)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// stagesOf lists the stages a boot went through, in order.
func stagesOf(spans []timeline.Span) []timeline.Stage {
	var out []timeline.Stage
	for _, s := range spans {
		out = append(out, s.Stage)
	}
	return out
}

// expectedStages is the path every boot of a chain takes to its marker: a
// root's between the init and the marker.
func expectedStages(p harness.Chain, root string) []timeline.Stage {
	out := []timeline.Stage{timeline.Firmware, timeline.DHCP, timeline.Loader, timeline.Kernel, timeline.Init}
	if p.Firmware == qemu.Direct {
		out = []timeline.Stage{timeline.Firmware, timeline.Kernel, timeline.Init}
	}
	if root != harness.RootNone {
		out = append(out, timeline.Root)
	}
	return append(out, timeline.Marker)
}

// TestEveryChainReachesTheMarker boots every chain onto each network root:
// every stage in order, the init on the address the lab's DHCP server
// leased, the root's own init reporting how / is mounted, and the root's
// service having logged the guest in once. Chains that cannot boot over
// IPv6 also boot with no root (the archive's own marker, a command line
// without root= or ip=); TestIPv6Boot boots the others so.
func TestEveryChainReachesTheMarker(t *testing.T) {
	needGuests(t)
	t.Parallel()
	for _, root := range []string{harness.RootNone, harness.RootNFS, harness.RootISCSI} {
		for _, p := range nbhtest.Chains() {
			if root == harness.RootNone && p.IPv6 {
				continue
			}
			name := root
			if root == harness.RootNone {
				name = "none"
			}
			t.Run(name+"/"+p.Name(), func(t *testing.T) {
				guestTest(t)
				lab := nbhtest.NewLab(t)
				g, err := lab.Boot(context.Background(), harness.Spec{Arch: p.Arch, Firmware: p.Firmware, Root: root,
					Artifacts: nbhtest.Artifacts(t, "g1")})
				assert.NilError(t, err)
				v := g.Wait(context.Background())
				assert.Assert(t, v.OK, "%v\nlast console lines:\n%s", v.Err(), strings.Join(v.Tail, "\n"))
				assert.Check(t, is.DeepEqual(stagesOf(g.Spans()), expectedStages(p, root)))
				t.Logf("%s: marker after %.2fs\n%s", p.Name(), v.Elapsed.Seconds(), timeline.Table(g.Spans(), g.Start))
				if root == harness.RootNone {
					// The init's marker line has the address the
					// lab's DHCP server leased.
					assert.Check(t, is.Contains(v.Line, "addr="+g.IP+"/24"))
					return
				}
				assert.Check(t, is.Contains(g.Console(), "nbh-init: network up addr="+g.IP+"/24"))
				assert.Check(t, is.Contains(v.Line, "boots=1 "), "the root's write did not land")
				want, event := "fstype=nfs source="+lab.Server()+":"+harness.NFSExport, "mount"
				if root == harness.RootISCSI {
					want, event = "fstype=ext4 source=/dev/sda", "login"
				}
				assert.Check(t, is.Contains(v.Line, want))
				var n int
				for _, e := range lab.Timeline().Events("g1") {
					if (e.Source == "nfs" || e.Source == "iscsi") && e.Kind == event {
						n++
					}
				}
				assert.Check(t, n == 1, "%d %s events on the timeline", n, event)
			})
		}
	}
}

// TestFailuresAreClassified boots chains with faults and checks each ends
// in its classified reason at the right stage, before a generous deadline:
// a failure must never be reported as a bare timeout.
func TestFailuresAreClassified(t *testing.T) {
	needGuests(t)
	t.Parallel()
	cases := []struct {
		arch, firmware string
		fault          string
		append         string
		want           failure.Reason
		stage          timeline.Stage
	}{
		{"amd64", "seabios-ipxe", "no-dhcp", "", failure.NoDHCP, timeline.DHCP},
		{"amd64", qemu.Direct, "no-dhcp", "", failure.NoDHCP, timeline.Init},
		{"arm64", "uboot", "no-dhcp", "", failure.NoDHCP, timeline.DHCP},
		// UEFI PXE retries DHCP for a minute, then tries IPv6: the DHCP
		// stage deadline (30 s) ends it, and the network says why.
		{"amd64", "ovmf-pxe", "no-dhcp", "", failure.NoDHCP, timeline.DHCP},
		{"arm64", "aavmf-grub", "no-dhcp", "", failure.NoDHCP, timeline.DHCP},
		{"amd64", "seabios-ipxe", "missing-kernel", "", failure.LoaderFetch, timeline.Loader},
		{"amd64", "ovmf-pxe", "missing-kernel", "", failure.LoaderFetch, timeline.Loader},
		{"arm64", "uboot", "missing-kernel", "", failure.LoaderFetch, timeline.Loader},
		{"riscv64", "uboot", "missing-kernel", "", failure.LoaderFetch, timeline.Loader},
		{"arm64", "aavmf-grub", "missing-kernel", "", failure.LoaderFetch, timeline.Loader},
		{"arm64", "aavmf-ipxe", "missing-kernel", "", failure.LoaderFetch, timeline.Loader},
		// UEFI HTTP boot: no Unified Kernel Image, a 404 for the firmware.
		{"amd64", "ovmf-http", "missing-kernel", "", failure.LoaderFetch, timeline.Loader},
		{"arm64", "aavmf-http", "missing-kernel", "", failure.LoaderFetch, timeline.Loader},
		// The archive's faults land in the archive inside the image.
		{"amd64", "ovmf-http", "truncated-archive", "", failure.LoaderFetch, timeline.Loader},
		// Where the flipped bit is found (the kernel's unpacker or the
		// init's integrity check) depends on what it lands in: any stage.
		{"arm64", "aavmf-http", "corrupt-archive", "", failure.CorruptArchive, timeline.None},
		// busybox run as the archive's init prints its help and exits: the
		// kernel panics ("Attempted to kill init").
		{"amd64", "seabios-ipxe", "", "rdinit=/bin/busybox", failure.KernelPanic, timeline.Kernel},
		{"arm64", qemu.Direct, "", "rdinit=/bin/busybox", failure.KernelPanic, timeline.Kernel},
	}
	for _, c := range cases {
		name := c.arch + "/" + c.firmware + "/" + c.fault
		if c.fault == "" {
			name = c.arch + "/" + c.firmware + "/panic"
		}
		t.Run(name, func(t *testing.T) {
			guestTest(t)
			if !selected(c.arch, c.firmware) {
				t.Skipf("chain %s/%s not selected by NBH_ARCH/NBH_FIRMWARE", c.arch, c.firmware)
			}
			spec := harness.Spec{Arch: c.arch, Firmware: c.firmware, Append: c.append, Timeout: 90 * time.Second,
				Artifacts: nbhtest.Artifacts(t, "g1")}
			if c.fault != "" {
				f, err := harness.LookupFault(c.fault)
				assert.NilError(t, err)
				spec.Faults = []harness.Fault{f}
			}
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(context.Background(), spec)
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			assert.Assert(t, !v.OK, "booted despite the fault: %s", v.Line)
			assert.Equal(t, v.Reason, c.want, "%v\nlast console lines:\n%s", v.Err(), strings.Join(v.Tail, "\n"))
			if c.stage != timeline.None {
				assert.Equal(t, v.Stage, c.stage, "%v", v.Err())
			}
			t.Logf("classified after %.1fs: %v", v.Elapsed.Seconds(), v.Err())
		})
	}
}

func selected(arch, firmware string) bool {
	for _, p := range nbhtest.Chains() {
		if p.Arch == arch && p.Firmware == firmware {
			return true
		}
	}
	return false
}

// TestFaultRefusedWhereMeaningless: a fault that cannot apply to a chain is
// an error at Boot, not a silently passing test.
func TestFaultRefusedWhereMeaningless(t *testing.T) {
	lab := nbhtest.NewLab(t)
	f, err := harness.LookupFault("missing-kernel")
	assert.NilError(t, err)
	_, err = lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: qemu.Direct, Faults: []harness.Fault{f}})
	assert.ErrorContains(t, err, "does not apply")
	_, err = lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: "uboot"})
	assert.ErrorContains(t, err, "not available for amd64")
}

// TestHTTPBootStaleArchive: on UEFI HTTP boot the archive travels inside the
// Unified Kernel Image; a stale one is found by the init as on every chain,
// and the keeper's rebuild (config-changed) rebuilds the image too (and,
// under Secure Boot, signs it again).
func TestHTTPBootStaleArchive(t *testing.T) {
	needGuests(t)
	t.Parallel()
	for _, c := range []struct{ arch, firmware, fault, secureBoot string }{
		{"amd64", "ovmf-http", "stale-config", ""},
		{"arm64", "aavmf-http", "stale-config", ""},
		{"amd64", "ovmf-http", "config-changed", ""},
		// Under Secure Boot the rebuilt image is signed again, or the
		// firmware would refuse it.
		{"arm64", "aavmf-http", "config-changed", harness.SecureBootOn},
	} {
		t.Run(c.arch+"/"+c.firmware+"/"+c.fault+"/"+c.secureBoot, func(t *testing.T) {
			guestTest(t)
			if !selected(c.arch, c.firmware) {
				t.Skipf("chain %s/%s not selected by NBH_ARCH/NBH_FIRMWARE", c.arch, c.firmware)
			}
			f, err := harness.LookupFault(c.fault)
			assert.NilError(t, err)
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(context.Background(), harness.Spec{Arch: c.arch, Firmware: c.firmware, Root: harness.RootNFS, SecureBoot: c.secureBoot,
				Faults: []harness.Fault{f}, Artifacts: nbhtest.Artifacts(t, "g1")})
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			if f.Expect == failure.None {
				assert.Assert(t, v.OK, "%v", v.Err())
				rebuilt := false
				for _, e := range lab.Timeline().Events("g1") {
					rebuilt = rebuilt || (e.Source == "archive" && e.Kind == "rebuild")
				}
				assert.Assert(t, rebuilt, "the keeper did not rebuild the image")
				return
			}
			assert.Equal(t, v.Reason, f.Expect, "%v", v.Err())
			assert.Equal(t, v.Stage, timeline.Root, "%v", v.Err())
		})
	}
}

// TestQEMUUserNetComparison: the chains BenchmarkNetboot also runs on QEMU's
// own user-mode network boot there to the marker, and the others are
// refused rather than measured wrong.
func TestQEMUUserNetComparison(t *testing.T) {
	needGuests(t)
	t.Parallel()
	for _, name := range harness.UserNetChains() {
		arch, firmware, _ := strings.Cut(name, "/")
		t.Run(name, func(t *testing.T) {
			guestTest(t)
			if !selected(arch, firmware) {
				t.Skipf("chain %s not selected by NBH_ARCH/NBH_FIRMWARE", name)
			}
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(context.Background(), harness.Spec{Arch: arch, Firmware: firmware, UserNet: true, Artifacts: nbhtest.Artifacts(t, "g1")})
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			assert.Assert(t, v.OK, "%v", v.Err())
			assert.Assert(t, strings.Contains(strings.Join(g.Argv(), " "), "-netdev user,"), "not on QEMU's user network: %v", g.Argv())
			// The lab's services saw nothing of it.
			for _, e := range lab.Timeline().Events("g1") {
				assert.Assert(t, e.Source != "dhcp" && e.Source != "tftp" && e.Source != "http", "the lab served it: %+v", e)
			}
		})
	}
	lab := nbhtest.NewLab(t)
	_, err := lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: "ovmf-http", UserNet: true})
	assert.ErrorContains(t, err, "cannot boot on QEMU's user-mode network")
}
