package harness

import (
	"net"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/dhcp"
	"nbh.dev/nbh/harness/failure"
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
}

// TestRefineByNetworkEvidence: console wording differs per firmware; the
// timeline decides.
func TestRefineByNetworkEvidence(t *testing.T) {
	tl := timeline.New()
	g := &Guest{Name: "g1", lab: &Lab{Timeline: tl}}
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "ignored", Guest: "g1", Msg: "no-dhcp fault: DISCOVER"})
	v := g.refine(Verdict{Reason: failure.FirmwareNoBoot, Stage: timeline.Firmware, Line: "Nothing to boot"})
	assert.Equal(t, v.Reason, failure.NoDHCP)
	assert.Equal(t, v.Stage, timeline.DHCP)

	tl = timeline.New()
	g.lab.Timeline = tl
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "discover", Guest: "g1"})
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "ack", Guest: "g1"})
	tl.Emit(timeline.Event{Source: "http", Kind: "not-found", Guest: "g1", Msg: "/g1/vmlinuz 404"})
	v = g.refine(Verdict{Reason: failure.LoaderError, Stage: timeline.Loader, Line: "error: you need to load the kernel first."})
	assert.Equal(t, v.Reason, failure.LoaderFetch)
	assert.Assert(t, strings.Contains(v.Detail, "/g1/vmlinuz"), v.Detail)

	// Past the loader, the console's word stands.
	v = g.refine(Verdict{Reason: failure.KernelPanic, Stage: timeline.Kernel})
	assert.Equal(t, v.Reason, failure.KernelPanic)
}

// TestConclusiveEvidenceEndsTheBoot: a silent DHCP server settles the boot
// on the guest's third ignored message (not the first two); a broken-off
// archive settles it after the grace period unless the guest's own report
// comes first.
func TestConclusiveEvidenceEndsTheBoot(t *testing.T) {
	newGuest := func() (*Guest, *timeline.Timeline) {
		tl := timeline.New()
		g := &Guest{Name: "g1", lab: &Lab{Timeline: tl}, decided: make(chan struct{}), Start: time.Now()}
		tl.Subscribe(g.conclude)
		return g, tl
	}
	g, tl := newGuest()
	for i := 0; i < conclusiveIgnored-1; i++ {
		tl.Emit(timeline.Event{Source: "dhcp", Kind: "ignored", Guest: "g1", Stage: timeline.DHCP})
	}
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "ignored", Guest: "g2", Stage: timeline.DHCP}) // another guest's
	select {
	case <-g.decided:
		t.Fatal("decided before the client retried enough")
	case <-time.After(200 * time.Millisecond):
	}
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "ignored", Guest: "g1", Stage: timeline.DHCP})
	select {
	case <-g.decided:
	case <-time.After(5 * time.Second):
		t.Fatal("not decided on the third ignored message")
	}
	assert.Equal(t, g.verdict.Reason, failure.NoDHCP)
	assert.Equal(t, g.verdict.Stage, timeline.DHCP)
	assert.Assert(t, strings.Contains(g.verdict.Detail, "ignored 3 DHCP messages"), g.verdict.Detail)

	// The loader reports the broken download itself within the grace: its
	// word stands.
	g, tl = newGuest()
	tl.Emit(timeline.Event{Source: "lab", Kind: "fired", Guest: "g1", Msg: "truncated-archive: cut", Detail: map[string]any{"fault": "truncated-archive"}})
	g.decide(Verdict{Reason: failure.LoaderFetch, Stage: timeline.Loader, Line: "Input/output error"})
	assert.Equal(t, g.verdict.Line, "Input/output error")
}
