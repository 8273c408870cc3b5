package scenarios

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/timeline"
)

// TestISCSIWriteSurvivesReboot boots a guest twice under the same name: the
// second boot finds what the first wrote on its iSCSI disk.
func TestISCSIWriteSurvivesReboot(t *testing.T) {
	guestTest(t)
	if !selected("arm64", "direct") {
		t.Skip("arm64/direct not selected")
	}
	lab := nbhtest.NewLab(t)
	for boot := 1; boot <= 2; boot++ {
		g, err := lab.Boot(context.Background(), harness.Spec{Name: "box", Arch: "arm64", Firmware: "direct", Root: harness.RootISCSI})
		assert.NilError(t, err)
		v := g.Wait(context.Background())
		assert.Assert(t, v.OK, "boot %d: %v", boot, v.Err())
		assert.Check(t, is.Contains(v.Line, fmt.Sprintf("boots=%d ", boot)))
		assert.NilError(t, g.Close())
	}
}

// TestTwoGuestsShareOneExport boots two guests at once from the same export
// path; each writes into its own copy of the root.
func TestTwoGuestsShareOneExport(t *testing.T) {
	guestTest(t)
	if !selected("arm64", "direct") {
		t.Skip("arm64/direct not selected")
	}
	lab := nbhtest.NewLab(t)
	var wg sync.WaitGroup
	verdicts := make([]harness.Verdict, 2)
	for i := range verdicts {
		g, err := lab.Boot(context.Background(), harness.Spec{Arch: "arm64", Firmware: "direct", Root: harness.RootNFS,
			Artifacts: nbhtest.Artifacts(t, "g"+string(rune('1'+i)))})
		assert.NilError(t, err)
		wg.Add(1)
		go func() {
			defer wg.Done()
			verdicts[i] = g.Wait(context.Background())
		}()
	}
	wg.Wait()
	for i, v := range verdicts {
		assert.Assert(t, v.OK, "guest %d: %v", i+1, v.Err())
		assert.Check(t, is.Contains(v.Line, "source="+lab.Server()+":"+harness.NFSExport))
		// Each guest counted its boot in its own copy of the root.
		assert.Check(t, is.Contains(v.Line, "boots=1 "))
	}
}

// TestWrongRootIsARootFailure: a wrong NFS export path and a wrong iSCSI
// target name each end as "cannot mount root" at the root stage.
func TestWrongRootIsARootFailure(t *testing.T) {
	needGuests(t)
	t.Parallel()
	if !selected("amd64", "direct") {
		t.Skip("amd64/direct not selected")
	}
	for _, c := range []struct{ root, fault string }{
		{harness.RootNFS, "nfs-wrong-export"},
		{harness.RootISCSI, "iscsi-wrong-iqn"},
		{harness.RootISCSI, "iscsi-bad-chap"},
	} {
		t.Run(c.fault, func(t *testing.T) {
			guestTest(t)
			f, err := harness.LookupFault(c.fault)
			assert.NilError(t, err)
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: "direct", Root: c.root,
				Faults: []harness.Fault{f}, Timeout: 90 * time.Second, Artifacts: nbhtest.Artifacts(t, "g1")})
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			assert.Equal(t, v.Reason, failure.RootMount, "%v", v.Err())
			assert.Equal(t, v.Stage, timeline.Root)
			t.Logf("classified after %.1fs: %v", v.Elapsed.Seconds(), v.Err())
		})
	}
}

// TestRootSpellings boots the NFS root as users write it on the kernel
// command line: Debian's nfsroot= (also "auto", from DHCP option 17),
// dracut's root=nfs:, and root=dhcp.
func TestRootSpellings(t *testing.T) {
	needGuests(t)
	t.Parallel()
	if !selected("arm64", "direct") {
		t.Skip("arm64/direct not selected")
	}
	for _, append := range []string{
		"root=/dev/nfs nfsroot=10.0.2.2:/nbh/root,vers=3,tcp ip=dhcp",
		"root=/dev/nfs nfsroot=auto ip=dhcp",
		"root=/dev/nfs ip=dhcp",
		"root=nfs:10.0.2.2:/nbh/root:vers=3,tcp",
		"root=dhcp",
	} {
		t.Run(append, func(t *testing.T) {
			guestTest(t)
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(context.Background(), harness.Spec{Arch: "arm64", Firmware: "direct", Root: harness.RootNFS, Append: append})
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			assert.Assert(t, v.OK, "%v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
			assert.Check(t, is.Contains(v.Line, "fstype=nfs source=10.0.2.2:/nbh/root"))
		})
	}
}

// TestISCSIWithCHAP: a target that requires CHAP lets the guest in with the
// right secret.
func TestISCSIWithCHAP(t *testing.T) {
	guestTest(t)
	if !selected("arm64", "direct") {
		t.Skip("arm64/direct not selected")
	}
	lab := nbhtest.NewLab(t)
	g, err := lab.Boot(context.Background(), harness.Spec{Arch: "arm64", Firmware: "direct", Root: harness.RootISCSI, CHAP: true})
	assert.NilError(t, err)
	v := g.Wait(context.Background())
	assert.Assert(t, v.OK, "%v", v.Err())
	var chap bool
	for _, e := range lab.Timeline().Events("g1") {
		if e.Source == "iscsi" && e.Kind == "login" {
			chap, _ = e.Detail["chap"].(bool)
		}
	}
	assert.Assert(t, chap, "the login did not use CHAP")
}
