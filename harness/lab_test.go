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

// bootedGuest is a guest of a lab with only a timeline, in its first boot.
func bootedGuest(tl *timeline.Timeline) *Guest {
	g := &Guest{Name: "g1", lab: &Lab{tl: tl, ctx: context.Background()}}
	g.newBoot(time.Now())
	return g
}

// TestRefineByNetworkEvidence: console wording differs per firmware; the
// timeline decides.
func TestRefineByNetworkEvidence(t *testing.T) {
	tl := timeline.New()
	g := bootedGuest(tl)
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "ignored", Guest: "g1", Msg: "no-dhcp fault: DISCOVER"})
	v := g.refine(g.cur, Verdict{Reason: failure.FirmwareNoBoot, Stage: timeline.Firmware, Line: "Nothing to boot"})
	assert.Equal(t, v.Reason, failure.NoDHCP)
	assert.Equal(t, v.Stage, timeline.DHCP)

	tl = timeline.New()
	g = bootedGuest(tl)
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "discover", Guest: "g1"})
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "ack", Guest: "g1"})
	tl.Emit(timeline.Event{Source: "http", Kind: "not-found", Guest: "g1", Msg: "/g1/vmlinuz 404"})
	v = g.refine(g.cur, Verdict{Reason: failure.LoaderError, Stage: timeline.Loader, Line: "error: you need to load the kernel first."})
	assert.Equal(t, v.Reason, failure.LoaderFetch)
	assert.Assert(t, strings.Contains(v.Detail, "/g1/vmlinuz"), v.Detail)

	// Past the loader, the console's word stands.
	v = g.refine(g.cur, Verdict{Reason: failure.KernelPanic, Stage: timeline.Kernel})
	assert.Equal(t, v.Reason, failure.KernelPanic)
}

// TestConclusiveEvidenceEndsTheBoot: a silent DHCP server settles the boot
// on the guest's third ignored message (not the first two); a broken-off
// archive settles it after the grace period unless the guest's own report
// comes first.
func TestConclusiveEvidenceEndsTheBoot(t *testing.T) {
	newGuest := func() (*Guest, *timeline.Timeline) {
		tl := timeline.New()
		g := bootedGuest(tl)
		tl.Subscribe(g.conclude)
		return g, tl
	}
	g, tl := newGuest()
	for i := 0; i < conclusiveIgnored-1; i++ {
		tl.Emit(timeline.Event{Source: "dhcp", Kind: "ignored", Guest: "g1", Stage: timeline.DHCP})
	}
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "ignored", Guest: "g2", Stage: timeline.DHCP}) // another guest's
	select {
	case <-g.cur.decided:
		t.Fatal("decided before the client retried enough")
	case <-time.After(200 * time.Millisecond):
	}
	tl.Emit(timeline.Event{Source: "dhcp", Kind: "ignored", Guest: "g1", Stage: timeline.DHCP})
	select {
	case <-g.cur.decided:
	case <-time.After(5 * time.Second):
		t.Fatal("not decided on the third ignored message")
	}
	assert.Equal(t, g.cur.verdict.Reason, failure.NoDHCP)
	assert.Equal(t, g.cur.verdict.Stage, timeline.DHCP)
	assert.Assert(t, strings.Contains(g.cur.verdict.Detail, "ignored 3 DHCP messages"), g.cur.verdict.Detail)

	// The loader reports the broken download itself within the grace: its
	// word stands.
	g, tl = newGuest()
	tl.Emit(timeline.Event{Source: "lab", Kind: "fired", Guest: "g1", Msg: "truncated-archive: cut", Detail: map[string]any{"fault": "truncated-archive"}})
	g.decide(Verdict{Reason: failure.LoaderFetch, Stage: timeline.Loader, Line: "Input/output error"})
	assert.Equal(t, g.cur.verdict.Line, "Input/output error")
}

// TestDeadlinesCountProgress: bytes moving on a transfer keep a stage alive
// past its deadline, and a transfer that stops moving ends the boot as
// stalled, naming the file and how far it got; a finished transfer is not
// watched.
func TestDeadlinesCountProgress(t *testing.T) {
	start := func(stall time.Duration) (*Guest, *timeline.Timeline, *boot) {
		tl := timeline.New()
		g := bootedGuest(tl)
		g.spec = Spec{StallWindow: stall, StageTimeouts: map[timeline.Stage]time.Duration{timeline.Loader: 600 * time.Millisecond}}
		g.unsub = append(g.unsub, tl.Subscribe(g.observe))
		b := g.current()
		tl.Emit(timeline.Event{Source: "tftp", Kind: "request", Guest: "g1", Stage: timeline.Loader, Msg: "g1/initrd"})
		go g.watch(b)
		return g, tl, b
	}
	verdict := func(b *boot) Verdict {
		select {
		case <-b.decided:
			return *b.verdict
		case <-time.After(10 * time.Second):
			t.Fatal("no verdict")
		}
		return Verdict{}
	}

	// Moving: every 200 ms for 2 s, well past the 600 ms stage deadline.
	g, tl, b := start(400 * time.Millisecond)
	for i := 0; i < 10; i++ {
		tl.Emit(timeline.Event{Source: "tftp", Kind: timeline.ProgressKind, Guest: "g1", Msg: "g1/initrd",
			Detail: map[string]any{"bytes": int64(1000 * (i + 1)), "of": int64(1 << 20), "open": true}})
		time.Sleep(200 * time.Millisecond)
		assert.Assert(t, !isDecided(b), "decided while bytes moved")
	}
	// Then nothing: stalled, within the window (and before the deadline
	// would say "deadline").
	v := verdict(b)
	assert.Equal(t, v.Reason, failure.Stalled, "%v", v.Err())
	assert.Equal(t, v.Stage, timeline.Loader)
	assert.Assert(t, strings.Contains(v.Detail, "g1/initrd") && strings.Contains(v.Detail, "10000 bytes of 1048576"), v.Detail)
	_ = g

	// A finished transfer is not watched: the stage's deadline decides.
	g, tl, b = start(100 * time.Millisecond)
	tl.Emit(timeline.Event{Source: "tftp", Kind: timeline.ProgressKind, Guest: "g1", Msg: "g1/initrd",
		Detail: map[string]any{"bytes": int64(5), "of": int64(5), "open": true}})
	tl.Emit(timeline.Event{Source: "tftp", Kind: "transfer", Guest: "g1", Msg: "g1/initrd 5 bytes"})
	v = verdict(b)
	assert.Equal(t, v.Reason, failure.Deadline, "%v", v.Err())
	assert.Assert(t, strings.Contains(v.Detail, "the last bytes moved"), v.Detail)
	_ = g
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
