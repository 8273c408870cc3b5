package scenarios

import (
	"context"
	"encoding/binary"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/netfab"
	"nbh.dev/nbh/harness/timeline"
)

// ipsecChains are the chains the IPsec scenarios boot: one per architecture.
var ipsecChains = []struct{ arch, firmware string }{{"amd64", "seabios-ipxe"}, {"arm64", "uboot"}}

// wireCount counts what a guest's capture shows: ESP packets, and clear
// TCP or UDP packets to or from the protected services (portmapper, NFS,
// iSCSI), and the largest frame.
type wireCount struct {
	esp, clearProtected, largest int
}

func countWire(t *testing.T, capture string) wireCount {
	t.Helper()
	frames, err := netfab.ReadCapture(capture)
	assert.NilError(t, err)
	var c wireCount
	for _, f := range frames {
		d := f.Data
		c.largest = max(c.largest, len(d))
		if len(d) < 34 || binary.BigEndian.Uint16(d[12:]) != 0x0800 {
			continue
		}
		ihl := int(d[14]&0x0f) * 4
		switch proto := d[23]; proto {
		case ipsec.ProtoESP:
			c.esp++
		case ipsec.ProtoTCP, ipsec.ProtoUDP:
			if len(d) < 14+ihl+4 {
				continue
			}
			sp, dp := binary.BigEndian.Uint16(d[14+ihl:]), binary.BigEndian.Uint16(d[14+ihl+2:])
			for _, port := range []uint16{111, 2049, 3260} {
				if sp == port || dp == port {
					c.clearProtected++
				}
			}
		}
	}
	return c
}

func netipOf(t *testing.T, ip string) netip.Addr {
	t.Helper()
	a, err := netip.ParseAddr(ip)
	assert.NilError(t, err)
	return a
}

// TestIPsecRoot boots NFS and iSCSI roots on an IPsec-required network on
// both architectures: the Linux kernel's ESP (set up by the reference init
// from the keys in its archive) talks to the harness's ESP both ways, and
// the capture holds ESP and not one clear packet of the root's services.
// amd64 uses AES-128 keys, arm64 AES-256.
func TestIPsecRoot(t *testing.T) {
	needGuests(t)
	t.Parallel()
	for _, c := range ipsecChains {
		if !selected(c.arch, c.firmware) {
			continue
		}
		bits := map[string]int{"amd64": 128, "arm64": 256}[c.arch]
		for _, root := range []string{harness.RootNFS, harness.RootISCSI} {
			t.Run(c.arch+"/"+c.firmware+"/"+root, func(t *testing.T) {
				guestTest(t)
				lab := nbhtest.NewLabWith(t, harness.Options{IPsec: ipsec.Required(), ESPKeyBits: bits})
				dir := nbhtest.Artifacts(t, "g1")
				g, err := lab.Boot(context.Background(), harness.Spec{Arch: c.arch, Firmware: c.firmware, Root: root, Artifacts: dir})
				assert.NilError(t, err)
				v := g.Wait(context.Background())
				assert.Assert(t, v.OK, "%v\nlast console lines:\n%s", v.Err(), strings.Join(v.Tail, "\n"))
				assert.Check(t, is.Contains(v.Line, "boots=1 "), "the root's write did not land")
				assert.Check(t, is.Contains(g.Console(), "nbh-init: ESP up:"))
				assert.Check(t, is.Contains(g.Console(), "AES-"+map[int]string{128: "128", 256: "256"}[bits]))
				peer := lab.ESP().Peer(netipOf(t, g.IP))
				assert.Assert(t, peer != nil)
				in, out := peer.In.Counters(), peer.Out.Counters()
				t.Logf("guest to lab: %+v; lab to guest: %+v", in, out)
				// The kernel's ESP opened by ours, ours opened by the kernel
				// (the root was read and written through both SAs).
				assert.Check(t, in.Packets > 10 && in.AuthFailures == 0 && in.Replays == 0, "%+v", in)
				assert.Check(t, out.Packets > 10, "%+v", out)
				assert.NilError(t, g.Close())
				w := countWire(t, filepath.Join(dir, "network.pcapng"))
				assert.Check(t, w.esp > 20, "%d ESP packets in the capture", w.esp)
				assert.Check(t, w.clearProtected == 0, "%d clear packets of the root's services in the capture", w.clearProtected)
				assert.Check(t, w.largest <= 1514, "a %d-byte frame on a 1500-byte MTU", w.largest)
			})
		}
	}
}

// TestIPsecFaults: what an IPsec-required network does to boots that cannot
// speak ESP where they must, each classified with the gateway's evidence,
// and a replay that it absorbs.
func TestIPsecFaults(t *testing.T) {
	needGuests(t)
	t.Parallel()
	for _, c := range ipsecChains {
		if !selected(c.arch, c.firmware) {
			continue
		}
		cases := []struct {
			fault, root string
			want        failure.Reason
			stage       timeline.Stage
			evidence    string // in the verdict's detail
		}{
			{"ipsec-no-keys", harness.RootNFS, failure.ESPRequired, timeline.Root, "the policy requires ESP"},
			{"ipsec-wrong-key", harness.RootNFS, failure.ESPAuth, timeline.Root, "2 authentication failures"},
			{"ipsec-wrong-spi", harness.RootISCSI, failure.ESPNoSA, timeline.Root, "matches no SA"},
			{"loader-nfs", harness.RootNFS, failure.LoaderNoIPsec, timeline.Loader, "a boot loader has no ESP"},
			{"esp-replay", harness.RootISCSI, failure.None, timeline.Marker, ""},
		}
		if c.arch == "arm64" {
			cases[0].root = harness.RootISCSI // and amd64 covers NFS
		}
		for _, tc := range cases {
			t.Run(c.arch+"/"+c.firmware+"/"+tc.fault+"/"+tc.root, func(t *testing.T) {
				guestTest(t)
				lab := nbhtest.NewLabWith(t, harness.Options{IPsec: ipsec.Required()})
				f, err := harness.LookupFault(tc.fault)
				assert.NilError(t, err)
				// A boot that cannot reach its root must be told so well
				// within a minute: a hang ends in "deadline exceeded".
				g, err := lab.Boot(context.Background(), harness.Spec{Arch: c.arch, Firmware: c.firmware, Root: tc.root,
					Faults: []harness.Fault{f}, Timeout: 60 * time.Second, Artifacts: nbhtest.Artifacts(t, "g1")})
				assert.NilError(t, err)
				v := g.Wait(context.Background())
				peer := lab.ESP().Peer(netipOf(t, g.IP))
				if tc.want == failure.None {
					assert.Assert(t, v.OK, "%v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
					in := peer.In.Counters()
					assert.Check(t, in.Replays > 10 && in.Packets > 10, "replays dropped %d, packets opened %d", in.Replays, in.Packets)
					return
				}
				assert.Assert(t, !v.OK, "booted with %s", tc.fault)
				assert.Check(t, is.Equal(v.Reason, tc.want), "%v", v.Err())
				assert.Check(t, is.Equal(v.Stage, tc.stage), "%v", v.Err())
				assert.Check(t, is.Contains(v.Detail, tc.evidence))
				assert.Check(t, is.Equal(peer.In.Counters().Packets, uint64(0)), "the lab opened ESP from a guest with a bad SA")
			})
		}
	}
}

// TestIPsecPathMTU: on a 1400-byte path the lab sizes TFTP blocks and TCP
// segments (ESP included) to fit, the guest takes the MTU from DHCP, and a
// 16 MiB read from the NFS root through ESP completes; the fabric drops
// any larger frame, so one that slipped through would break the boot.
func TestIPsecPathMTU(t *testing.T) {
	guestTest(t)
	if !selected("arm64", "uboot") {
		t.Skip("arm64/uboot not selected")
	}
	lab := nbhtest.NewLabWith(t, harness.Options{IPsec: ipsec.Required(), MTU: 1400})
	file := filepath.Join(t.TempDir(), "big.bin")
	writeRandomFile(t, file, 16<<20)
	dir := nbhtest.Artifacts(t, "g1")
	g, err := lab.Boot(context.Background(), harness.Spec{Arch: "arm64", Firmware: "uboot", Root: harness.RootNFS,
		RootFiles: map[string]string{"/big.bin": file}, Append: "nbh.readtest=/big.bin", Expect: readLine.String(), Artifacts: dir})
	assert.NilError(t, err)
	v := g.Wait(context.Background())
	assert.Assert(t, v.OK, "%v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
	assert.Check(t, is.Contains(v.Line, "16777216 bytes"))
	var blksize any
	for _, e := range lab.Timeline().Events("g1") {
		assert.Check(t, e.Kind != "oversize", "%s", e.Msg)
		if e.Source == "tftp" && e.Kind == "transfer" && strings.HasPrefix(e.Msg, "g1/vmlinuz ") {
			blksize = e.Detail["blksize"]
		}
	}
	assert.Check(t, is.Equal(blksize, 1368), "TFTP block size on a 1400-byte path")
	assert.NilError(t, g.Close())
	w := countWire(t, filepath.Join(dir, "network.pcapng"))
	assert.Check(t, w.largest <= 1414, "a %d-byte frame on a 1400-byte path", w.largest)
	assert.Check(t, w.esp > 16<<20/1400, "%d ESP packets for 16 MiB", w.esp)
	assert.Check(t, w.clearProtected == 0)
}
