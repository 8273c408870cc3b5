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
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/timeline"
)

// TestConversation is the first seed's story, told with the conversation
// API: a guest boots on its NFS root and stays at a shell; commands run in
// it give their output and status; it changes its root's configuration
// from inside and reboots; the second boot is a boot of its own (events,
// spans, verdict), the write survived, and the boot server rebuilt the
// archive for the changed root — or, with the refresh off, the second boot
// is classified stale.
func TestConversation(t *testing.T) {
	for _, refresh := range []bool{true, false} {
		name := map[bool]string{true: "refresh", false: "no-refresh"}[refresh]
		t.Run(name, func(t *testing.T) {
			guestTest(t)
			if !selected("amd64", "seabios-ipxe") {
				t.Skip("amd64/seabios-ipxe not selected")
			}
			ctx := context.Background()
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(ctx, harness.Spec{Arch: "amd64", Firmware: "seabios-ipxe", Root: harness.RootNFS, Shell: true,
				NoArchiveRefresh: !refresh, Artifacts: nbhtest.Artifacts(t, "g1")})
			assert.NilError(t, err)
			v := g.Wait(ctx)
			assert.Assert(t, v.OK, "%v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
			assert.Equal(t, g.Boot(), 1)
			_, err = g.Expect(ctx, `nbh-root# $`)
			assert.NilError(t, err)

			out, status, err := g.Run(ctx, "cat /proc/cmdline")
			assert.NilError(t, err)
			assert.Equal(t, status, 0)
			assert.Check(t, strings.HasSuffix(out, "\n") && strings.Count(out, "\n") == 1, "%q", out)
			for _, want := range []string{"root=/dev/nfs", "nbh.shell=1", "nfsroot=" + lab.Server()} {
				assert.Check(t, is.Contains(out, want))
			}
			out, status, err = g.Run(ctx, "echo x > /etc/nbh-drift; sync")
			assert.NilError(t, err)
			assert.Equal(t, out, "")
			assert.Equal(t, status, 0)
			out, status, err = g.Run(ctx, "false")
			assert.NilError(t, err)
			assert.Equal(t, out, "")
			assert.Equal(t, status, 1)
			// The administrator's change to the configuration the
			// archive carries a copy of.
			_, status, err = g.Run(ctx, "echo site=changed-from-inside >> /etc/nbh/boot.conf; sync")
			assert.NilError(t, err)
			assert.Equal(t, status, 0)
			first := g.BootStart()

			assert.NilError(t, g.Reboot(ctx))
			assert.Equal(t, g.Boot(), 2)
			assert.Assert(t, g.BootStart().After(first))
			v = g.Wait(ctx)
			// Every event of the guest is of one boot: before the reset
			// the first, after it the second (the lab's timeline, not
			// the guest's view of its current boot).
			for _, e := range lab.Timeline().Events("g1") {
				want := 1
				if !e.Time.Before(g.BootStart()) {
					want = 2
				}
				assert.Check(t, e.Boot == want, "%s %s at %s: boot %d, want %d", e.Source, e.Kind, e.Time.Sub(first), e.Boot, want)
			}
			spans := g.Spans()
			assert.Assert(t, len(spans) > 0)
			assert.Equal(t, spans[0].Stage, timeline.Firmware)
			assert.Check(t, !spans[0].Start.Before(g.BootStart()))
			assert.Check(t, v.Elapsed < time.Since(g.BootStart())+time.Second, "boot 2's verdict counts from its own start")
			var rebuilt bool
			for _, e := range g.Events() {
				rebuilt = rebuilt || e.Source == "archive" && e.Kind == "rebuild"
			}
			if refresh {
				assert.Assert(t, v.OK, "%v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
				assert.Check(t, rebuilt, "the keeper did not rebuild the archive for the changed root")
				assert.Check(t, is.Contains(g.Console(), "NBH-ARCHIVE fresh"))
				_, err = g.Expect(ctx, `nbh-root# $`)
				assert.NilError(t, err)
				out, status, err = g.Run(ctx, "cat /etc/nbh-drift /root/boots")
				assert.NilError(t, err)
				assert.Equal(t, status, 0)
				assert.Equal(t, out, "x\n2\n", "the first boot's write is on the root, and the root counted two boots")
				assert.NilError(t, g.PowerOff(ctx))
			} else {
				assert.Assert(t, !v.OK, "the second boot passed on a stale archive")
				assert.Equal(t, v.Reason, failure.StaleArchive, "%v", v.Err())
				assert.Equal(t, v.Stage, timeline.Root, "%v", v.Err())
				assert.Check(t, !rebuilt)
			}
			// The first boot's verdict and events stay its own.
			boot1 := lab.Timeline().BootEvents("g1", 1)
			assert.Assert(t, len(boot1) > 0)
			for _, e := range boot1 {
				assert.Check(t, e.Time.Before(g.BootStart()) || e.Time.Equal(g.BootStart()), "%+v", e)
			}
		})
	}
}

// TestConversationUnderIPsec: Run works on a guest whose root is reachable
// only through ESP (the console is not the network, but the shell's
// commands read the root through the tunnel).
func TestConversationUnderIPsec(t *testing.T) {
	guestTest(t)
	if !selected("amd64", "seabios-ipxe") {
		t.Skip("amd64/seabios-ipxe not selected")
	}
	ctx := context.Background()
	lab := nbhtest.NewLabWith(t, harness.Options{IPsec: ipsec.Required()})
	g, err := lab.Boot(ctx, harness.Spec{Arch: "amd64", Firmware: "seabios-ipxe", Root: harness.RootNFS, Shell: true,
		Artifacts: nbhtest.Artifacts(t, "g1")})
	assert.NilError(t, err)
	v := g.Wait(ctx)
	assert.Assert(t, v.OK, "%v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
	out, status, err := g.Run(ctx, "cat /etc/nbh/boot.conf | grep -c site=; ip -o xfrm state 2>/dev/null | wc -l")
	assert.NilError(t, err)
	assert.Equal(t, status, 0)
	assert.Check(t, strings.HasPrefix(out, "1\n"), "%q", out)
	// A reboot on the IPsec network: the rebooted kernel's ESP counts
	// from 1 again with the same keys, and reaches its root.
	assert.NilError(t, g.Reboot(ctx))
	v = g.Wait(ctx)
	assert.Assert(t, v.OK, "boot 2: %v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
	out, status, err = g.Run(ctx, "cat /root/boots")
	assert.NilError(t, err)
	assert.Equal(t, status, 0)
	assert.Equal(t, out, "2\n")
}
