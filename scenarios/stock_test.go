package scenarios

import (
	"context"
	"errors"
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
	"nbh.dev/nbh/images"
	"nbh.dev/nbh/images/stock"
)

// TestStockInitramfs boots archives made by Debian's initramfs-tools and by
// dracut for the Debian kernel through the lab's DHCP, NFS and iSCSI
// services: their own DHCP clients (klibc ipconfig, dhclient), mounters
// (klibc nfsmount, mount.nfs) and iSCSI initiator (iscsistart) against ours.
func TestStockInitramfs(t *testing.T) {
	needGuests(t)
	t.Parallel()
	cases := []struct {
		name, tool, root, append string
		chap                     bool
		want                     string
	}{
		// The lab's own command line: root=/dev/nfs nfsroot=SERVER:/PATH,vers=3,tcp ip=dhcp.
		{"initramfs-tools/nfsroot", stock.InitramfsTools, harness.RootNFS, "", false, "fstype=nfs source=10.0.2.2:/nbh/root"},
		// Server and path from DHCP option 17.
		{"initramfs-tools/nfsroot=auto", stock.InitramfsTools, harness.RootNFS, "root=/dev/nfs nfsroot=auto ip=dhcp", false, "fstype=nfs source=10.0.2.2:/nbh/root"},
		// Option 17 again; mount.nfs asks for NFSv4 first and must fall back to v3.
		{"dracut/root=dhcp", stock.Dracut, harness.RootNFS, "root=dhcp ip=dhcp", false, "fstype=nfs source=10.0.2.2:/nbh/root"},
		{"dracut/root=nfs:", stock.Dracut, harness.RootNFS, "root=nfs:10.0.2.2:/nbh/root:vers=3 ip=dhcp", false, "fstype=nfs source=10.0.2.2:/nbh/root"},
		// The lab's command line: root=/dev/sda netroot=iscsi:[USER:PASS@]SERVER::3260:0:IQN ip=dhcp.
		{"dracut/iscsi", stock.Dracut, harness.RootISCSI, "", false, "fstype=ext4 source=/dev/sda"},
		{"dracut/iscsi-chap", stock.Dracut, harness.RootISCSI, "", true, "fstype=ext4 source=/dev/sda"},
	}
	for _, arch := range images.Arches() {
		for _, c := range cases {
			t.Run(arch+"/"+c.name, func(t *testing.T) {
				guestTest(t)
				firmware := map[string]string{"amd64": "seabios-ipxe", "arm64": "uboot"}[arch]
				if !selected(arch, firmware) {
					t.Skipf("%s/%s not selected", arch, firmware)
				}
				lab := nbhtest.NewLab(t)
				a, err := stock.Build(context.Background(), lab.Cache(), c.tool, arch, testLog{t})
				if errors.Is(err, stock.ErrForeignArch) {
					t.Skip(err)
				}
				assert.NilError(t, err)
				g, err := lab.Boot(context.Background(), harness.Spec{Arch: arch, Firmware: firmware, Root: c.root,
					Initrd: a.Path, Append: c.append, CHAP: c.chap, Artifacts: nbhtest.Artifacts(t, "g1")})
				assert.NilError(t, err)
				v := g.Wait(context.Background())
				assert.Assert(t, v.OK, "%v\nlast console lines:\n%s", v.Err(), strings.Join(v.Tail, "\n"))
				assert.Check(t, is.Contains(v.Line, c.want))
				assert.Check(t, is.Contains(v.Line, "boots=1 "), "the root's write did not land")
				var events []string
				for _, e := range lab.Timeline().Events("g1") {
					if e.Source == "nfs" || e.Source == "iscsi" {
						events = append(events, e.Kind)
						if c.chap && e.Kind == "login" {
							chap, _ := e.Detail["chap"].(bool)
							assert.Check(t, chap, "the login did not use CHAP")
						}
					}
				}
				want := "mount"
				if c.root == harness.RootISCSI {
					want = "login"
				}
				assert.Check(t, is.Contains(events, want), "the %s service logged no %s: %v", c.root, want, events)
				if c.name == "dracut/root=dhcp" {
					assert.Check(t, is.Contains(events, "version-mismatch"), "mount.nfs did not ask for NFSv4 first: %v", events)
				}
			})
		}
	}
}

// testLog sends progress lines to the test log.
type testLog struct{ t *testing.T }

func (l testLog) Write(b []byte) (int, error) {
	l.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// TestStockFailuresAreClassified boots stock archives that cannot finish
// and checks each ends in the reason and stage its own messages show, with
// the line that decided it — not a bare deadline in the kernel stage.
func TestStockFailuresAreClassified(t *testing.T) {
	needGuests(t)
	t.Parallel()
	cases := []struct {
		name, tool, root, append, fault string
		want                            failure.Reason
		stage                           timeline.Stage
		line                            string
	}{
		// Its network driver kept from loading: initramfs-tools waits
		// 180 s for a network device; the root stage's deadline ends it.
		{"initramfs-tools/no-network-driver", stock.InitramfsTools, harness.RootNFS, "modprobe.blacklist=virtio_net", "",
			failure.NoNetDevice, timeline.Root, "Waiting up to 180 secs for any network device"},
		// klibc nfsmount retries a refused mount until the root stage's
		// deadline; the refusal is the evidence.
		{"initramfs-tools/nfs-wrong-export", stock.InitramfsTools, harness.RootNFS, "", "nfs-wrong-export",
			failure.RootMount, timeline.Root, "mount call failed - server replied: No such file or directory"},
		{"dracut/no-root-disk", stock.Dracut, harness.RootNone, "root=/dev/sdz rd.retry=6", "",
			failure.RootMount, timeline.Root, "Could not boot"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			guestTest(t)
			if !selected("amd64", qemu.Direct) {
				t.Skip("amd64/direct not selected")
			}
			lab := nbhtest.NewLab(t)
			a, err := stock.Build(context.Background(), lab.Cache(), c.tool, "amd64", testLog{t})
			if errors.Is(err, stock.ErrForeignArch) {
				t.Skip(err)
			}
			assert.NilError(t, err)
			// A shorter root stage: the waits are there within seconds.
			spec := harness.Spec{Arch: "amd64", Firmware: qemu.Direct, Root: c.root,
				Initrd: a.Path, Append: c.append, Artifacts: nbhtest.Artifacts(t, "g1"),
				StageTimeouts: map[timeline.Stage]time.Duration{timeline.Root: 20 * time.Second}}
			if c.fault != "" {
				spec.Faults = []harness.Fault{fault(t, c.fault)}
			}
			g, err := lab.Boot(context.Background(), spec)
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			assert.Assert(t, !v.OK, "booted: %s", v.Line)
			assert.Equal(t, v.Reason, c.want, "%v\nlast console lines:\n%s", v.Err(), strings.Join(v.Tail, "\n"))
			assert.Equal(t, v.Stage, c.stage, "%v", v.Err())
			assert.Check(t, is.Contains(v.Line, c.line), "%v", v.Err())
			// The init stage began at the kernel's "Run /init".
			assert.Check(t, is.Contains(stagesOf(g.Spans()), timeline.Init), "%v", stagesOf(g.Spans()))
			t.Logf("classified after %.1fs: %v", v.Elapsed.Seconds(), v.Err())
		})
	}
}
