package scenarios

import (
	"context"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/dhcp"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/timeline"
)

// TestIPv6Boot boots every chain that can over IPv6 only: router
// advertisements that say "managed", DHCPv6 for the firmware, the loader and
// the reference init (which prints its address), boot files over TFTP and
// HTTP on the server's IPv6 address, and no DHCPv4 answer at all.
func TestIPv6Boot(t *testing.T) {
	needGuests(t)
	t.Parallel()
	for _, p := range nbhtest.Chains() {
		if !p.IPv6 {
			continue
		}
		t.Run(p.Name(), func(t *testing.T) {
			guestTest(t)
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(context.Background(), harness.Spec{Arch: p.Arch, Firmware: p.Firmware, Family: dhcp.V6,
				Artifacts: nbhtest.Artifacts(t, "g1")})
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			assert.Assert(t, v.OK, "%v\nlast console lines:\n%s", v.Err(), strings.Join(v.Tail, "\n"))
			assert.Check(t, is.Contains(v.Line, "addr=fd4e:4248::15/64 server=fd4e:4248::2"))
			var v4, v6 []string
			var fetches int
			for _, e := range lab.Timeline().Events("g1") {
				switch {
				case e.Source == "dhcp" && e.Kind == "reply":
					v6 = append(v6, e.Msg)
				case e.Source == "dhcp" && (e.Kind == "offer" || e.Kind == "ack"):
					v4 = append(v4, e.Msg)
				case (e.Source == "http" || e.Source == "tftp") && e.Stage == timeline.Loader:
					fetches++
					assert.Check(t, is.Equal(e.Addr, "fd4e:4248::15"), "a boot file fetched over IPv4: %v", e)
				}
			}
			assert.Check(t, len(v6) > 0, "no DHCPv6 reply on the timeline")
			assert.Check(t, is.Len(v4, 0), "DHCPv4 answered an IPv6-only guest")
			if p.Firmware != "direct" {
				assert.Check(t, fetches > 0, "no boot file fetched over IPv6")
			}
		})
	}
}

// TestDualStackBoot: with both families the loaders boot over IPv4 and the
// init configures both, printing both addresses.
func TestDualStackBoot(t *testing.T) {
	needGuests(t)
	t.Parallel()
	for _, c := range []struct{ arch, firmware string }{{"amd64", "seabios-ipxe"}, {"arm64", "direct"}} {
		t.Run(c.arch+"/"+c.firmware, func(t *testing.T) {
			guestTest(t)
			if !selected(c.arch, c.firmware) {
				t.Skipf("%s/%s not selected", c.arch, c.firmware)
			}
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(context.Background(), harness.Spec{Arch: c.arch, Firmware: c.firmware, Family: dhcp.Dual,
				Artifacts: nbhtest.Artifacts(t, "g1")})
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			assert.Assert(t, v.OK, "%v\nlast console lines:\n%s", v.Err(), strings.Join(v.Tail, "\n"))
			assert.Check(t, is.Contains(v.Line, "addr=10.0.2.15/24 addr6=fd4e:4248::15/64 server=10.0.2.2"))
		})
	}
}

// TestIPv6NoDHCP: a guest the DHCPv6 server ignores ends "no DHCP lease",
// as on IPv4, at the loader's DHCP or the init's.
func TestIPv6NoDHCP(t *testing.T) {
	needGuests(t)
	t.Parallel()
	for _, c := range []struct {
		arch, firmware string
		stage          timeline.Stage
	}{{"amd64", "seabios-ipxe", timeline.DHCP}, {"amd64", "ovmf-http", timeline.DHCP}, {"amd64", "direct", timeline.Init}} {
		t.Run(c.arch+"/"+c.firmware, func(t *testing.T) {
			guestTest(t)
			if !selected(c.arch, c.firmware) {
				t.Skipf("%s/%s not selected", c.arch, c.firmware)
			}
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(context.Background(), harness.Spec{Arch: c.arch, Firmware: c.firmware, Family: dhcp.V6,
				Faults: []harness.Fault{fault(t, "no-dhcp")}, Timeout: 90 * time.Second, Artifacts: nbhtest.Artifacts(t, "g1")})
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			assert.Assert(t, !v.OK, "booted without DHCP: %s", v.Line)
			assert.Equal(t, v.Reason, failure.NoDHCP, "%v", v.Err())
			assert.Check(t, is.Equal(v.Stage, c.stage))
		})
	}
}

// TestIPv6NetworkRoots: NFS and iSCSI roots over IPv6 only. The kernel's
// MOUNT client finds MOUNT and NFS through rpcbind (version 4 GETADDR: a
// port number alone names no IPv6 address); the server sees every mount and
// login from the guest's IPv6 lease.
func TestIPv6NetworkRoots(t *testing.T) {
	needGuests(t)
	t.Parallel()
	for _, c := range []struct {
		arch, firmware, root string
		chap                 bool
	}{
		{"amd64", "direct", harness.RootNFS, false},
		{"amd64", "direct", harness.RootISCSI, true},
		{"amd64", "ovmf-http", harness.RootNFS, false},
		{"arm64", "direct", harness.RootNFS, false},
	} {
		t.Run(c.arch+"/"+c.firmware+"/"+c.root, func(t *testing.T) {
			guestTest(t)
			if !selected(c.arch, c.firmware) {
				t.Skipf("%s/%s not selected", c.arch, c.firmware)
			}
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(context.Background(), harness.Spec{Arch: c.arch, Firmware: c.firmware, Family: dhcp.V6,
				Root: c.root, CHAP: c.chap, Artifacts: nbhtest.Artifacts(t, "g1")})
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			assert.Assert(t, v.OK, "%v\nlast console lines:\n%s", v.Err(), strings.Join(v.Tail, "\n"))
			assert.Check(t, is.Contains(v.Line, "NBH-ROOT-READY boots=1"))
			var served []string
			for _, e := range lab.Timeline().Events("g1") {
				switch {
				case e.Source == "portmap":
					served = append(served, e.Kind+" "+e.Msg)
					assert.Check(t, is.Equal(e.Addr, "fd4e:4248::15"), "%v", e)
				case e.Source == "nfs" && e.Kind == "mount", e.Source == "iscsi" && e.Kind == "login":
					served = append(served, e.Source+" "+e.Kind)
					assert.Check(t, is.Equal(e.Addr, "fd4e:4248::15"), "%v", e)
				}
			}
			if c.root == harness.RootNFS {
				assert.Check(t, is.Contains(v.Line, "source=[fd4e:4248::2]:/nbh/root"))
				assert.Check(t, is.Contains(v.Line, "proto=tcp6"))
				assert.Check(t, is.Contains(served, `getaddr program 100005 v3 tcp6 -> "fd4e:4248::2.8.1"`))
				assert.Check(t, is.Contains(served, "nfs mount"))
			} else {
				assert.Check(t, is.Contains(served, "iscsi login"))
			}
		})
	}
}

// TestIPv6Refused: what cannot boot over IPv6 is refused at Boot, saying
// why and which chains can.
func TestIPv6Refused(t *testing.T) {
	lab := nbhtest.NewLab(t)
	_, err := lab.Boot(context.Background(), harness.Spec{Arch: "arm64", Firmware: "uboot", Family: dhcp.V6})
	assert.ErrorContains(t, err, "cannot boot over IPv6 (Debian 12's U-Boot (2023.01) is built without IPv6")
	assert.ErrorContains(t, err, "; amd64/seabios-ipxe")
	_, err = lab.Boot(context.Background(), harness.Spec{Arch: "arm64", Firmware: "aavmf-grub", Family: dhcp.V6})
	assert.ErrorContains(t, err, "arm64/aavmf-grub cannot boot over IPv6; ")
	_, err = lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: "ovmf-ipxe", Family: dhcp.V6, Root: harness.RootSANBoot})
	assert.ErrorContains(t, err, "no SAN boot over IPv6: iPXE writes only IPv4 addresses into the iBFT")
	_, err = lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: "seabios-ipxe", Family: "7"})
	assert.ErrorContains(t, err, "want 4, 6 or dual")
}
