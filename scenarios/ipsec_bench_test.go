package scenarios

import (
	"crypto/rand"
	"testing"
	"time"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/qemu"
)

// BenchmarkIPsec measures, in one run: a guest's sequential read of a
// 64 MiB file from its NFS root on a clear network and on an IPsec-required
// one (MB/s, and ESP as a ratio to clear), and the harness ESP's own seal and
// open throughput on one core (1400-byte payloads, AES-128-GCM and
// AES-256-GCM: seal-MB/s, open-MB/s).
//
//	go test -run '^$' -bench IPsec -benchtime 1x ./scenarios
func BenchmarkIPsec(b *testing.B) {
	file := benchFile(b)
	arch := "amd64"
	if !selected(arch, qemu.Direct) {
		arch = "arm64"
	}
	var clear float64
	for _, c := range []struct {
		name string
		opts harness.Options
	}{
		{"nfs-clear", harness.Options{}},
		{"nfs-esp", harness.Options{IPsec: ipsec.Required()}},
	} {
		b.Run(arch+"/"+c.name, func(b *testing.B) {
			var mbps float64
			for i := 0; i < b.N; i++ {
				mbps += readMBps(b, c.opts, harness.Spec{Arch: arch, Firmware: qemu.Direct, Root: harness.RootNFS,
					RootFiles: map[string]string{"/bench.bin": file}, Timeout: 5 * time.Minute}, nil)
			}
			mbps /= float64(b.N)
			b.ReportMetric(mbps, "MB/s")
			if c.name == "nfs-clear" {
				clear = mbps
			} else if clear > 0 {
				b.ReportMetric(mbps/clear, "x-clear")
			}
		})
	}
	// The harness ESP, timed for a second each in every iteration (so
	// -benchtime 1x, which the guest part wants, still measures it).
	for _, kl := range []int{16, 32} {
		name := map[int]string{16: "AES-128", 32: "AES-256"}[kl]
		b.Run("esp/"+name, func(b *testing.B) {
			var seal, open float64
			for i := 0; i < b.N; i++ {
				seal += espThroughput(b, kl, false)
				open += espThroughput(b, kl, true)
			}
			b.ReportMetric(seal/float64(b.N), "seal-MB/s")
			b.ReportMetric(open/float64(b.N), "open-MB/s")
		})
	}
}

// espThroughput seals (or opens) 1400-byte payloads on one core for about
// a second and returns MB/s. Opening needs packets sealed in order on fresh
// SAs (sequence numbers must not replay): they are sealed in batches outside
// the timed part.
func espThroughput(b *testing.B, keyLen int, opening bool) float64 {
	payload := make([]byte, 1400)
	pkts := make([][]byte, 4096)
	buf := make([]byte, 0, 1500)
	var timed time.Duration
	n := 0
	for timed < time.Second {
		out, in := espPair(b, keyLen)
		if opening {
			for j := range pkts {
				pkts[j], _ = out.Seal(pkts[j][:0], 6, payload)
			}
		}
		start := time.Now()
		for j := range pkts {
			if opening {
				if _, _, err := in.Open(pkts[j]); err != nil {
					b.Fatal(err)
				}
			} else {
				out.Seal(buf[:0], 6, payload)
			}
		}
		timed += time.Since(start)
		n += len(pkts)
	}
	return float64(n*len(payload)) / (1 << 20) / timed.Seconds()
}

// espPair is an outbound SA and the inbound SA that opens what it seals.
func espPair(b *testing.B, keyLen int) (out, in *ipsec.SA) {
	key := make([]byte, keyLen+4)
	rand.Read(key)
	out, err := ipsec.NewSA(0x1000, key)
	if err != nil {
		b.Fatal(err)
	}
	in, _ = ipsec.NewSA(0x1000, key)
	return out, in
}
