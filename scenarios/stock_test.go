package scenarios

import (
	"context"
	"errors"
	"strings"
	"testing"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"

	"nbh.dev/nbh/harness"
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
	for _, arch := range images.Arches {
		for _, c := range cases {
			t.Run(arch+"/"+c.name, func(t *testing.T) {
				guestTest(t)
				firmware := map[string]string{"amd64": "seabios-ipxe", "arm64": "uboot"}[arch]
				if !selected(arch, firmware) {
					t.Skipf("%s/%s not selected", arch, firmware)
				}
				lab := harness.NewTestLab(t)
				a, err := stock.Build(context.Background(), lab.Cache(), c.tool, arch, testLog{t})
				if errors.Is(err, stock.ErrForeignArch) {
					t.Skip(err)
				}
				assert.NilError(t, err)
				g, err := lab.Boot(context.Background(), harness.Spec{Arch: arch, Firmware: firmware, Root: c.root,
					Initrd: a.Path, Append: c.append, CHAP: c.chap, Artifacts: harness.TestArtifacts(t, "g1")})
				assert.NilError(t, err)
				v := g.Wait(context.Background())
				assert.Assert(t, v.OK, "%v\nlast console lines:\n%s", v.Err(), strings.Join(v.Tail, "\n"))
				assert.Check(t, is.Contains(v.Line, c.want))
				assert.Check(t, is.Contains(v.Line, "boots=1 "), "the root's write did not land")
				var events []string
				for _, e := range lab.Timeline.Events("g1") {
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
