package scenarios

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/qemu"
)

var readLine = regexp.MustCompile(`nbh-read: (\d+) bytes.* copied, ([0-9.]+) seconds`)

// benchFile writes a 64 MiB file (see repeatFile).
func benchFile(b *testing.B) string {
	p := filepath.Join(b.TempDir(), "bench.bin")
	writeRandomFile(b, p, 64<<20)
	return p
}

// writeRandomFile writes size bytes to path: a random 16 KiB block over and
// over, so a boot archive that carries it stays small while every page
// differs within the block.
func writeRandomFile(tb testing.TB, path string, size int) {
	block := make([]byte, 16<<10)
	rand.Read(block)
	f, err := os.Create(path)
	if err != nil {
		tb.Fatal(err)
	}
	for i := 0; i < size/len(block); i++ {
		f.Write(block)
	}
	if err := f.Close(); err != nil {
		tb.Fatal(err)
	}
}

// BenchmarkRoot reads a 64 MiB file sequentially in the guest: from the
// boot archive in RAM (the baseline), from the NFS root, from the iSCSI root
// and, where Debian's tgt is installed, from the same root served by tgt;
// it reports MB/s, the ratio to RAM and ours against tgt, all measured in
// the same run.
//
//	go test -run '^$' -bench Root -benchtime 1x ./scenarios
func BenchmarkRoot(b *testing.B) {
	file := benchFile(b)
	arch := "amd64"
	if !selected(arch, qemu.Direct) {
		arch = "arm64"
	}
	var ram, ours float64
	for _, c := range []struct {
		name string
		spec harness.Spec
	}{
		{"ram", harness.Spec{ArchiveFiles: map[string]string{"/bench.bin": file}}},
		{"nfs", harness.Spec{Root: harness.RootNFS, RootFiles: map[string]string{"/bench.bin": file}}},
		{"iscsi", harness.Spec{Root: harness.RootISCSI, RootFiles: map[string]string{"/bench.bin": file}}},
		// The same root from Debian's tgt, reached through a relay on the
		// lab's port 3261 (skipped where tgt is not installed).
		{"iscsi-tgt", harness.Spec{Root: harness.RootISCSI}},
	} {
		b.Run(arch+"/"+c.name, func(b *testing.B) {
			var mbps float64
			var portal string
			if c.name == "iscsi-tgt" {
				portal = startTGT(b, arch, map[string]string{"/bench.bin": file})
			}
			for i := 0; i < b.N; i++ {
				spec := c.spec
				spec.Arch, spec.Firmware = arch, qemu.Direct
				mbps += readMBps(b, harness.Options{}, spec, func(lab *harness.Lab, spec *harness.Spec) {
					if portal != "" {
						if err := lab.Forward(3261, portal); err != nil {
							b.Fatal(err)
						}
						spec.Append += " netroot=iscsi:" + lab.Server() + "::3261:1:" + tgtIQN
					}
				})
			}
			mbps /= float64(b.N)
			b.ReportMetric(mbps, "MB/s")
			switch {
			case c.name == "ram":
				ram = mbps
			case ram > 0:
				b.ReportMetric(mbps/ram, "x-ram")
			}
			if c.name == "iscsi" {
				ours = mbps
			} else if c.name == "iscsi-tgt" && mbps > 0 && ours > 0 {
				b.ReportMetric(ours/mbps, "ours-x-tgt")
			}
		})
	}
}

// readMBps boots one guest that reads /bench.bin (nbh.readtest) and returns
// the MB/s it reports; only the boot is timed. prepare, if set, adjusts the
// lab and the spec first.
func readMBps(b *testing.B, opts harness.Options, spec harness.Spec, prepare func(*harness.Lab, *harness.Spec)) float64 {
	b.StopTimer()
	lab := nbhtest.NewLabWith(b, opts)
	defer lab.Close()
	spec.Append += " nbh.readtest=/bench.bin"
	spec.Expect = readLine.String()
	if prepare != nil {
		prepare(lab, &spec)
	}
	b.StartTimer()
	g, err := lab.Boot(context.Background(), spec)
	if err != nil {
		b.Fatal(err)
	}
	v := g.Wait(context.Background())
	b.StopTimer()
	if !v.OK {
		b.Fatalf("%v", v.Err())
	}
	m := readLine.FindStringSubmatch(v.Line)
	n, _ := strconv.ParseFloat(m[1], 64)
	secs, _ := strconv.ParseFloat(m[2], 64)
	return n / (1 << 20) / secs
}
