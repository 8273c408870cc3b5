package archive_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"nbh.dev/nbh/fixtures"
	"nbh.dev/nbh/images"
	"nbh.dev/nbh/images/stock"
)

// BenchmarkArchive reports the time and size of building the reference
// archive for the cached amd64 kernel: cold (an empty build cache) and
// cached (the same spec again), and — where mmdebstrap can make the chroot —
// Debian's mkinitramfs building an archive with the same modules
// (MODULES=list), timed inside the chroot. Run it with -benchtime 1x.
//
//	go test -run '^$' -bench Archive -benchtime 1x ./harness/archive
func BenchmarkArchive(b *testing.B) {
	ctx := context.Background()
	c := images.Open(os.Getenv("NBH_CACHE"))
	k, err := c.Kernel(ctx, "amd64")
	if err != nil {
		b.Skipf("no cached kernel (run make setup): %v", err)
	}
	// Build the init once, outside the timings: both paths share it.
	if _, err := fixtures.Reference(ctx, c, k, fixtures.Options{}); err != nil {
		b.Fatal(err)
	}
	var coldSecs float64
	b.Run("reference/cold", func(b *testing.B) {
		for b.Loop() {
			b.StopTimer()
			dir := b.TempDir()
			b.StartTimer()
			r, err := buildInto(ctx, c, k, dir)
			if err != nil {
				b.Fatal(err)
			}
			fi, _ := os.Stat(r)
			b.ReportMetric(float64(fi.Size()), "bytes")
		}
		coldSecs = b.Elapsed().Seconds() / float64(b.N)
	})
	b.Run("reference/cached", func(b *testing.B) {
		dir := b.TempDir()
		if _, err := buildInto(ctx, c, k, dir); err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			if _, err := buildInto(ctx, c, k, dir); err != nil {
				b.Fatal(err)
			}
		}
		if coldSecs > 0 {
			b.ReportMetric(b.Elapsed().Seconds()/float64(b.N)/coldSecs, "x-cold")
		}
	})
	b.Run("mkinitramfs", func(b *testing.B) {
		if _, err := exec.LookPath("mmdebstrap"); err != nil {
			b.Skip("mmdebstrap is not installed: no Debian mkinitramfs to compare with")
		}
		mods := append(append(append([]string(nil), fixtures.NetModules()...), fixtures.NFSModules()...), fixtures.ISCSIModules()...)
		for b.Loop() {
			a, err := stock.BuildWith(ctx, c, stock.InitramfsTools, "amd64", stock.Options{Modules: mods, Rebuild: true}, nil)
			if err != nil {
				b.Skip(err)
			}
			fi, _ := os.Stat(a.Path)
			b.ReportMetric(float64(fi.Size()), "bytes")
			b.ReportMetric(a.Seconds, "generator-s")
			if coldSecs > 0 {
				b.ReportMetric(a.Seconds/coldSecs, "x-reference-cold")
			}
		}
	})
}

// buildInto builds the reference archive with its content cache in dir.
func buildInto(ctx context.Context, c *images.Cache, k *images.Kernel, dir string) (string, error) {
	r, err := fixtures.ReferenceIn(ctx, c, k, fixtures.Options{}, filepath.Join(dir, "archives"))
	if err != nil {
		return "", err
	}
	return r.Path, nil
}
