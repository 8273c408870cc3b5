package harness

import (
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/dhcp"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/iscsi"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/images"
)

// TestBootFilePolicy: what each kind of DHCP client is told to boot.
func TestBootFilePolicy(t *testing.T) {
	lab, err := New(Options{Cache: images.Open(t.TempDir())})
	assert.NilError(t, err)
	defer lab.Close()
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 1}
	// A guest ready for any loader of its arch (nbh serve's): the first
	// chain of the arch whose rule knows the client answers.
	g := &Guest{Name: "g1", MAC: mac, lab: lab, spec: Spec{Root: RootNFS, AnyLoader: true}, plan: plan{nfsPath: NFSExport, iqn: ISCSITarget}}
	lab.guests[mac.String()] = g
	cases := []struct {
		arch string
		c    dhcp.Client
		file string
		root string
	}{
		{"amd64", dhcp.Client{MAC: mac, Arch: 0, UserClass: "iPXE", IPXE: true}, "http://10.0.2.2/g1/boot.ipxe", ""},
		{"arm64", dhcp.Client{MAC: mac, Arch: dhcp.ArchUBootA64, VendorClass: "U-Boot.armv8"}, "boot.scr.uimg", ""},
		{"amd64", dhcp.Client{MAC: mac, Arch: dhcp.ArchEFIx64, VendorClass: "PXEClient:Arch:00007:UNDI:003000"}, "ipxe.efi", ""},
		{"arm64", dhcp.Client{MAC: mac, Arch: dhcp.ArchEFIArm64, VendorClass: "PXEClient:Arch:00011:UNDI:003000"}, "g1/grubnetaa64.efi", ""},
		{"amd64", dhcp.Client{MAC: mac, Arch: 16, VendorClass: "HTTPClient:Arch:00016:UNDI:003001"}, "http://10.0.2.2/g1/boot.efi", ""},
		{"arm64", dhcp.Client{MAC: mac, Arch: 19, VendorClass: "HTTPClient:Arch:00019:UNDI:003001"}, "http://10.0.2.2/g1/boot.efi", ""},
		{"amd64", dhcp.Client{MAC: mac, Arch: dhcp.ArchNone, VendorClass: "nbh-init"}, "", "10.0.2.2:/nbh/root"},
		{"amd64", dhcp.Client{MAC: mac, Arch: dhcp.ArchNone, VendorClass: "Linux ipconfig"}, "", "10.0.2.2:/nbh/root"},   // initramfs-tools
		{"amd64", dhcp.Client{MAC: mac, Arch: dhcp.ArchNone}, "", "10.0.2.2:/nbh/root"},                                  // dracut's dhclient
		{"arm64", dhcp.Client{MAC: mac, Arch: dhcp.ArchEFIx64, VendorClass: "PXEClient:Arch:00007:UNDI:003000"}, "", ""}, // no arm64 chain boots x86
		{"amd64", dhcp.Client{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 9}, Arch: dhcp.ArchEFIx64}, "", ""},                   // not a guest of this lab
	}
	for _, c := range cases {
		g.Profile.Arch = c.arch
		b := lab.policy(c.c)
		assert.Equal(t, b.File, c.file, "%s", c.c)
		assert.Equal(t, b.RootPath, c.root, "%s", c.c)
		assert.Assert(t, b.Why != "", "no reason given for %s", c.c)
	}
	g.spec.Root = RootISCSI
	assert.Equal(t, lab.policy(cases[6].c).RootPath, "iscsi:10.0.2.2::3260:0:"+ISCSITarget)
	assert.Equal(t, lab.policy(cases[8].c).RootPath, "iscsi:10.0.2.2::3260:0:"+ISCSITarget)
	g.spec.Root = RootNone
	assert.Equal(t, lab.policy(cases[8].c).RootPath, "", "a guest without a root gets no root path")

	// No secret in a DHCP option: a CHAP guest's root path names no
	// credentials; its command line (only in its own loader config) does.
	g.spec.Root, g.chap = RootISCSI, &iscsi.CHAP{User: "u1", Secret: "s3cret"}
	for _, c := range cases[6:9] {
		assert.Assert(t, !strings.Contains(lab.policy(c.c).RootPath, "s3cret"), "%s", c.c)
	}
	assert.Assert(t, strings.Contains(g.cmdline(), "netroot=iscsi:u1:s3cret@"), g.cmdline())
}

// bootedGuest is a guest of a lab with only a timeline, in its first boot.
func bootedGuest(tl *timeline.Timeline) *Guest {
	g := &Guest{Name: "g1", lab: &Lab{tl: tl, ctx: context.Background()}}
	g.newBoot(time.Now())
	return g
}

// TestTheLabStagesServiceEvents: services say what happened and name no
// stage; the lab's timeline gives each event the stage it starts.
func TestTheLabStagesServiceEvents(t *testing.T) {
	lab, err := New(Options{Cache: images.Open(t.TempDir())})
	assert.NilError(t, err)
	defer lab.Close()
	cases := []struct {
		e    timeline.Event
		want timeline.Stage
	}{
		{timeline.Event{Source: "dhcp", Kind: "discover"}, timeline.DHCP},
		{timeline.Event{Source: "dhcp", Kind: "ignored", Detail: map[string]any{"message": "request"}}, timeline.DHCP},
		{timeline.Event{Source: "dhcp", Kind: "ignored", Detail: map[string]any{"message": "release"}}, timeline.None},
		{timeline.Event{Source: "dhcp", Kind: "ack"}, timeline.None},
		{timeline.Event{Source: "tftp", Kind: "request"}, timeline.Loader},
		{timeline.Event{Source: "http", Kind: "request"}, timeline.Loader},
		{timeline.Event{Source: "http", Kind: "transfer"}, timeline.None},
		{timeline.Event{Source: "portmap", Kind: "getport"}, timeline.Root},
		{timeline.Event{Source: "nfs", Kind: "mount"}, timeline.Root},
		{timeline.Event{Source: "iscsi", Kind: "login", Addr: "10.0.2.99"}, timeline.Root},          // no SAN-booting guest there
		{timeline.Event{Source: "console", Kind: "stage", Stage: timeline.Kernel}, timeline.Kernel}, // a stage given stands
	}
	for _, c := range cases {
		lab.Timeline().Emit(c.e)
		evs := lab.Timeline().Events("")
		assert.Equal(t, evs[len(evs)-1].Stage, c.want, "%s %s", c.e.Source, c.e.Kind)
	}
}

// TestGuestNeverStarted: every method of a guest that was provisioned but
// never started answers with an error (or a Setup verdict), never a panic.
func TestGuestNeverStarted(t *testing.T) {
	g := bootedGuest(timeline.New())
	ctx := context.Background()
	v := g.Wait(ctx)
	assert.Equal(t, v.Reason, failure.Setup)
	assert.ErrorIs(t, g.Attach(io.Discard), errNotStarted)
	assert.ErrorIs(t, g.Send("x"), errNotStarted)
	_, err := g.Expect(ctx, "x")
	assert.ErrorIs(t, err, errNotStarted)
	_, _, err = g.Run(ctx, "true")
	assert.ErrorIs(t, err, errNotStarted)
	assert.ErrorIs(t, g.Login(ctx, "root", ""), errNotStarted)
	assert.ErrorIs(t, g.Reboot(ctx), errNotStarted)
	assert.ErrorIs(t, g.Reset(ctx), errNotStarted)
	assert.ErrorIs(t, g.PowerOff(ctx), errNotStarted)
	assert.Equal(t, len(g.Argv()), 0)
	assert.Equal(t, g.Boot(), 1)
}
