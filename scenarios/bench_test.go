package scenarios

import (
	"context"
	"testing"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/qemu"
)

// BenchmarkNetboot measures, per chain, the time from QEMU's start to the
// marker, and reports it as a ratio to the direct (-kernel/-initrd) boot of
// the same archive on the same architecture, measured in the same run.
//
//	go test -run '^$' -bench Netboot -benchtime 1x ./scenarios
func BenchmarkNetboot(b *testing.B) {
	direct := map[string]float64{}
	chains := harness.Chains()
	// Baselines first, so every ratio has its direct boot from this run.
	var ordered []harness.Chain
	for _, p := range chains {
		if p.Firmware == qemu.Direct {
			ordered = append(ordered, p)
		}
	}
	for _, p := range chains {
		if p.Firmware != qemu.Direct {
			ordered = append(ordered, p)
		}
	}
	for _, p := range ordered {
		b.Run(p.Name(), func(b *testing.B) {
			var total float64
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				lab := nbhtest.NewLab(b)
				b.StartTimer()
				g, err := lab.Boot(context.Background(), harness.Spec{Arch: p.Arch, Firmware: p.Firmware})
				if err != nil {
					b.Fatal(err)
				}
				v := g.Wait(context.Background())
				b.StopTimer()
				if !v.OK {
					b.Fatalf("%s: %v", p.Name(), v.Err())
				}
				total += v.Elapsed.Seconds()
				lab.Close()
			}
			mean := total / float64(b.N)
			b.ReportMetric(mean, "s/marker")
			if p.Firmware == qemu.Direct {
				direct[p.Arch] = mean
			}
			if d, ok := direct[p.Arch]; ok && d > 0 {
				b.ReportMetric(mean/d, "x-direct")
			}
		})
	}
}
