package scenarios

import (
	"context"
	"testing"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/dhcp"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/qemu"
)

// BenchmarkNetboot measures, per chain, the time from QEMU's start to the
// marker, and reports it as a ratio to the direct (-kernel/-initrd) boot of
// the same archive on the same architecture, measured in the same run. The
// chains that can also boot on QEMU's own user-mode network (its built-in
// DHCP and TFTP: what users pick instead of a boot network) run there too,
// as CHAIN/qemu-user-net, so the table sets nbh's network against it. As
// root, seabios-ipxe, ovmf-pxe, ovmf-http and arm64's uboot also boot on
// the network a team runs instead (CHAIN/dnsmasq: a bridge and a tap
// device in a network namespace of the benchmark's own, dnsmasq for DHCP
// and TFTP, busybox's httpd; the same files), reported also as a ratio to
// nbh's network (x-nbh; skipped, with the reason, where it cannot run). The
// chains that can SAN-boot boot onto an iSCSI root twice: with kernel and
// archive fetched over HTTP (CHAIN/root=iscsi), then from the disk itself
// (CHAIN/root=sanboot, reported also as a ratio to the fetched boot). The
// chains that boot over IPv6 do so too (CHAIN/ip=6, also as a ratio to the
// chain's IPv4 boot): DHCPv6 with preference 255 against EDK2's fixed 4 s
// of DHCPv4 offer collection, and iPXE waiting out DHCPv4.
//
//	go test -run '^$' -bench Netboot -benchtime 1x ./scenarios
func BenchmarkNetboot(b *testing.B) {
	type run struct {
		harness.Chain
		userNet bool
		root    string
		family  string
		// secureBoot is Spec.SecureBoot, set for the boot of a chain with
		// Secure Boot the other way from its default.
		secureBoot string
		// realLab boots the chain on the dnsmasq network (realLab).
		realLab bool
	}
	chains := nbhtest.Chains()
	// Baselines first, so every ratio has its direct boot from this run.
	var runs []run
	for _, c := range chains {
		if c.Firmware == qemu.Direct {
			runs = append(runs, run{Chain: c})
		}
	}
	for _, c := range chains {
		if c.Firmware != qemu.Direct {
			// Secure Boot's cost: the chain with it off first, then on.
			if c.Secure != nil && c.SecureBoot {
				runs = append(runs, run{Chain: c, secureBoot: harness.SecureBootOff})
			}
			runs = append(runs, run{Chain: c})
			if c.Secure != nil && !c.SecureBoot {
				runs = append(runs, run{Chain: c, secureBoot: harness.SecureBootOn})
			}
			if c.UserNet != "" {
				runs = append(runs, run{Chain: c, userNet: true})
			}
			if _, ok := realLabChains[c.Name()]; ok {
				runs = append(runs, run{Chain: c, realLab: true})
			}
			if c.IPv6 {
				runs = append(runs, run{Chain: c, family: dhcp.V6})
			}
			if c.SANBoot {
				runs = append(runs, run{Chain: c, root: harness.RootISCSI}, run{Chain: c, root: harness.RootSANBoot})
			}
		}
	}
	direct := map[string]float64{}
	fetched := map[string]float64{}  // CHAIN/root=iscsi
	ipv4 := map[string]float64{}     // CHAIN
	insecure := map[string]float64{} // CHAIN with Secure Boot off
	for _, r := range runs {
		name := r.Name()
		if r.userNet {
			name += "/qemu-user-net"
		}
		if r.root != "" {
			name += "/root=" + r.root
		}
		if r.family != "" {
			name += "/ip=" + r.family
		}
		if r.secureBoot != "" {
			name += "/secure-boot=" + r.secureBoot
		}
		if r.realLab {
			name += "/dnsmasq"
		}
		b.Run(name, func(b *testing.B) {
			if why := realLabMissing(); r.realLab && why != "" {
				b.Skip(why)
			}
			var total float64
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				lab := nbhtest.NewLab(b)
				spec := harness.Spec{Arch: r.Arch, Firmware: r.Firmware, UserNet: r.userNet, Root: r.root, Family: r.family, SecureBoot: r.secureBoot}
				var rl *realLab
				if r.realLab {
					var err error
					if rl, err = startRealLab(b, lab, r.Name()); err != nil {
						b.Fatal(err)
					}
					spec.TapNet = rl.tap
				}
				b.StartTimer()
				g, err := lab.Boot(context.Background(), spec)
				if err != nil {
					b.Fatal(err)
				}
				v := g.Wait(context.Background())
				b.StopTimer()
				if rl != nil {
					rl.stop()
				}
				if !v.OK {
					b.Fatalf("%s: %v", name, v.Err())
				}
				total += v.Elapsed.Seconds()
				lab.Close()
			}
			mean := total / float64(b.N)
			b.ReportMetric(mean, "s/marker")
			if r.Firmware == qemu.Direct {
				direct[r.Arch] = mean
			}
			if f := ipv4[r.Name()]; r.realLab && f > 0 {
				// Below 1: the real lab is faster than nbh's network.
				b.ReportMetric(mean/f, "x-nbh")
			}
			plain := r.root == "" && r.family == "" && !r.userNet && !r.realLab
			if plain && r.secureBoot == "" {
				ipv4[r.Name()] = mean
			}
			if plain && r.Secure != nil {
				if on, _ := r.WithSecureBoot(r.secureBoot); !on.SecureBoot {
					insecure[r.Name()] = mean
				} else if f := insecure[r.Name()]; f > 0 {
					b.ReportMetric(mean/f, "x-no-secure-boot")
				}
			}
			if f := ipv4[r.Name()]; r.family != "" && f > 0 {
				b.ReportMetric(mean/f, "x-ipv4")
			}
			if d, ok := direct[r.Arch]; ok && d > 0 && r.root == "" {
				// (A boot onto a root is not the direct boot's peer.)
				b.ReportMetric(mean/d, "x-direct")
			}
			switch r.root {
			case harness.RootISCSI:
				fetched[r.Name()] = mean
			case harness.RootSANBoot:
				if f := fetched[r.Name()]; f > 0 {
					b.ReportMetric(mean/f, "x-fetched")
				}
			}
		})
	}
}
