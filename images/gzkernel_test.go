package images

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"testing"

	"gotest.tools/v3/assert"
)

// TestGzipped: the compressed kernel decompresses (with the standard
// library's reader, not the writer's package) to the image's bytes, is
// made once, and an image already compressed is served as it is.
func TestGzipped(t *testing.T) {
	c := &Cache{Dir: t.TempDir(), Log: io.Discard}
	img := filepath.Join(c.Dir, "pkgs", "linux-image-x_1_arm64", "boot", "vmlinuz-x")
	assert.NilError(t, os.MkdirAll(filepath.Dir(img), 0o755))
	data := bytes.Repeat([]byte("ARM64 Image, not compressed. "), 100000)
	assert.NilError(t, os.WriteFile(img, data, 0o644))
	k := &Kernel{Arch: "arm64", Image: img}
	gz, err := c.Gzipped(k)
	assert.NilError(t, err)
	f, err := os.Open(gz)
	assert.NilError(t, err)
	defer f.Close()
	zr, err := gzip.NewReader(f)
	assert.NilError(t, err)
	got, err := io.ReadAll(zr)
	assert.NilError(t, err)
	assert.Assert(t, bytes.Equal(got, data))
	fi, _ := os.Stat(gz)
	assert.Assert(t, fi.Size() < int64(len(data))/10)
	again, err := c.Gzipped(k)
	assert.NilError(t, err)
	assert.Equal(t, again, gz)

	k2 := &Kernel{Arch: "arm64", Image: gz}
	same, err := c.Gzipped(k2)
	assert.NilError(t, err)
	assert.Equal(t, same, gz, "an image already compressed is served as it is")

	outside := filepath.Join(t.TempDir(), "vmlinuz")
	assert.NilError(t, os.WriteFile(outside, data, 0o644))
	_, err = c.Gzipped(&Kernel{Image: outside})
	assert.ErrorContains(t, err, "not a cached package's kernel")
}
