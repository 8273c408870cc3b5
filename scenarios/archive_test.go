package scenarios

import (
	"context"
	"strings"
	"testing"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/timeline"
)

// TestArchiveLifecycle boots every kind of boot-archive staleness and
// damage, and the good paths, on both arches: an iPXE chain fetching over
// HTTP and U-Boot fetching over TFTP. Each failure must be classified with
// its reason at the stage where it shows.
func TestArchiveLifecycle(t *testing.T) {
	needGuests(t)
	t.Parallel()
	cases := []struct {
		fault   string
		root    string
		want    failure.Reason // None: the boot reaches the marker
		stage   timeline.Stage
		console string // a line the console must show
	}{
		{"stale-config", harness.RootNFS, failure.StaleArchive, timeline.Root, "NBH-ARCHIVE stale /etc/nbh/boot.conf archive="},
		{"config-changed", harness.RootNFS, failure.None, 0, "NBH-ARCHIVE fresh tracked=1"},
		{"module-skew", harness.RootNone, failure.StaleArchive, timeline.Init, "NBH-ARCHIVE stale kernel archive="},
		{"missing-module", harness.RootNFS, failure.MissingModule, timeline.Root, "nfsv3.ko is not in the archive, nor on the boot server"},
		{"missing-module", harness.RootISCSI, failure.MissingModule, timeline.Root, "iscsi_tcp.ko is not in the archive, nor on the boot server"},
		{"truncated-archive", harness.RootNone, failure.LoaderFetch, timeline.Loader, ""},
		// The kernel finds damage it cannot unpack past; what it unpacks
		// "fine" (it does not check a gzip archive's CRC) the init's
		// integrity check finds: either way, a corrupt archive.
		{"corrupt-archive", harness.RootNone, failure.CorruptArchive, timeline.Kernel, ""},
		{"archive-swap", harness.RootNFS, failure.None, 0, "NBH-ARCHIVE stale /etc/nbh/boot.conf archive="},
	}
	for _, chain := range [][2]string{{"amd64", "seabios-ipxe"}, {"arm64", "uboot"}} {
		for _, c := range cases {
			root := c.root
			if root == harness.RootNone {
				root = "none"
			}
			t.Run(chain[0]+"/"+c.fault+"/"+root, func(t *testing.T) {
				guestTest(t)
				if !selected(chain[0], chain[1]) {
					t.Skipf("%s/%s not selected", chain[0], chain[1])
				}
				f, err := harness.LookupFault(c.fault)
				assert.NilError(t, err)
				lab := nbhtest.NewLab(t)
				g, err := lab.Boot(context.Background(), harness.Spec{Arch: chain[0], Firmware: chain[1], Root: c.root,
					Faults: []harness.Fault{f}, Artifacts: nbhtest.Artifacts(t, "g1")})
				assert.NilError(t, err)
				v := g.Wait(context.Background())
				tail := strings.Join(v.Tail, "\n")
				if c.want == failure.None {
					assert.Assert(t, v.OK, "%v\n%s", v.Err(), tail)
				} else {
					assert.Assert(t, !v.OK, "booted despite %s", c.fault)
					assert.Equal(t, v.Reason, c.want, "%v\n%s", v.Err(), tail)
					if c.fault == "corrupt-archive" && v.Stage == timeline.Init {
						assert.Check(t, is.Contains(g.Console(), "NBH-ARCHIVE corrupt"))
					} else {
						assert.Equal(t, v.Stage, c.stage, "%v", v.Err())
					}
					t.Logf("classified after %.1fs: %v", v.Elapsed.Seconds(), v.Err())
				}
				if c.console != "" {
					assert.Check(t, is.Contains(g.Console(), c.console))
				}
				events := lab.Timeline().Events("g1")
				switch c.fault {
				case "config-changed":
					// The boot server rebuilt the archive before the fetch,
					// because the root changed: the cause names the file.
					assert.Check(t, hasEvent(events, "archive", "rebuild", "/etc/nbh/boot.conf"), "no rebuild on the timeline")
					assert.Check(t, is.Contains(g.Console(), "config site=changed-after-the-archive-was-built"))
				case "stale-config":
					assert.Check(t, !hasEvent(events, "archive", "rebuild", ""), "refresh was off, yet the archive was rebuilt")
				case "archive-swap":
					// The rebuild happened while the archive was in flight,
					// and the guest got the whole old archive: the kernel
					// unpacked it and the init found it stale.
					req, rebuild, done := -1, -1, -1
					for i, e := range events {
						switch {
						case (e.Source == "http" || e.Source == "tftp") && e.Kind == "request" && strings.Contains(e.Msg, "initrd.img") && req < 0:
							req = i
						case e.Source == "archive" && e.Kind == "rebuild":
							rebuild = i
						case (e.Source == "http" || e.Source == "tftp") && e.Kind == "transfer" && strings.Contains(e.Msg, "initrd.img"):
							done = i
						}
					}
					assert.Check(t, req >= 0 && req < rebuild && rebuild < done, "request %d, rebuild %d, transfer done %d", req, rebuild, done)
					assert.Check(t, is.Contains(g.Console(), "booting on (nbh.archive=warn)"))
				case "missing-module":
					assert.Check(t, hasEvent(events, "http", "not-found", "/g1/files/lib/modules/"), "the init did not ask the boot server")
				}
			})
		}
	}
}

// TestArchiveFreshAndZstd: a zstd archive boots, and a network root's
// archive is checked and found fresh; a local root's carries no copies.
func TestArchiveFreshAndZstd(t *testing.T) {
	needGuests(t)
	t.Parallel()
	for _, root := range []string{harness.RootNFS, harness.RootISCSI} {
		t.Run(root, func(t *testing.T) {
			guestTest(t)
			if !selected("arm64", "direct") {
				t.Skip("arm64/direct not selected")
			}
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(context.Background(), harness.Spec{Arch: "arm64", Firmware: "direct", Root: root, Compression: "zstd"})
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			assert.Assert(t, v.OK, "%v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
			want := map[string]string{
				harness.RootNFS:   "NBH-ARCHIVE fresh tracked=1",
				harness.RootISCSI: "NBH-ARCHIVE fresh tracked=0",
			}[root]
			assert.Check(t, is.Contains(g.Console(), want))
			// The editable configuration: from the archive on a network
			// root, from the root itself on a local one.
			from := map[string]string{harness.RootNFS: "lookup /etc/nbh/boot.conf: archive", harness.RootISCSI: "lookup /etc/nbh/boot.conf: root"}[root]
			assert.Check(t, is.Contains(g.Console(), from))
			assert.Check(t, hasEvent(lab.Timeline().Events("g1"), "archive", "build", "zstd"))
		})
	}
}

// hasEvent reports an event of source (any, when "") and kind whose message
// contains msg.
func hasEvent(events []timeline.Event, source, kind, msg string) bool {
	for _, e := range events {
		if (source == "" || e.Source == source) && e.Kind == kind && strings.Contains(e.Msg, msg) {
			return true
		}
	}
	return false
}

// TestSignedArchive: GRUB with the lab's key built in and signatures
// enforced boots what the lab signed — also an archive the boot server
// rebuilt (and re-signed) because the root changed — and refuses an archive
// changed after signing, classified at the loader.
func TestSignedArchive(t *testing.T) {
	needGuests(t)
	t.Parallel()
	if !selected("arm64", "aavmf-grub") {
		t.Skip("arm64/aavmf-grub not selected")
	}
	cases := []struct {
		fault string
		want  failure.Reason
	}{
		{"config-changed", failure.None},
		{"tampered-archive", failure.BadSignature},
	}
	for _, c := range cases {
		t.Run(c.fault, func(t *testing.T) {
			guestTest(t)
			f, err := harness.LookupFault(c.fault)
			assert.NilError(t, err)
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(context.Background(), harness.Spec{Arch: "arm64", Firmware: "aavmf-grub", Root: harness.RootNFS, Signed: true,
				Faults: []harness.Fault{f}, Artifacts: nbhtest.Artifacts(t, "g1")})
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			events := lab.Timeline().Events("g1")
			for _, sig := range []string{"/g1/grub/grub.cfg.sig", "/g1/vmlinuz.sig", "/g1/initrd.img.sig"} {
				assert.Check(t, hasEvent(events, "", "transfer", sig), "GRUB did not fetch %s", sig)
			}
			if c.want == failure.None {
				assert.Assert(t, v.OK, "%v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
				assert.Check(t, hasEvent(events, "archive", "rebuild", "/etc/nbh/boot.conf"))
				return
			}
			assert.Assert(t, !v.OK, "GRUB booted a tampered archive")
			assert.Equal(t, v.Reason, c.want, "%v", v.Err())
			assert.Equal(t, v.Stage, timeline.Loader)
			assert.Check(t, is.Contains(v.Line, "bad signature"))
		})
	}
	// Loaders that cannot verify are refused, not silently unverified.
	lab := nbhtest.NewLab(t)
	_, err := lab.Boot(context.Background(), harness.Spec{Arch: "arm64", Firmware: "uboot", Signed: true})
	assert.ErrorContains(t, err, "cannot verify signatures")
}
