package bundle

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/klauspost/compress/zstd"
	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"
)

func sample(t *testing.T) string {
	dir := filepath.Join(t.TempDir(), "g1-bundle")
	assert.NilError(t, os.MkdirAll(filepath.Join(dir, FilesDir), 0o755))
	assert.NilError(t, os.WriteFile(filepath.Join(dir, FilesDir, "kernel"), []byte("kernel bytes"), 0o644))
	assert.NilError(t, os.WriteFile(filepath.Join(dir, "console.log"), []byte("[   0.1] hello\n"), 0o644))
	b := &Bundle{Lab: Lab{Seed: "S", MTU: 1400, IPsec: &Policy{Default: "discard", Rules: []Rule{{6, 2049, "protect"}}}},
		Spec: Spec{Arch: "arm64", Firmware: "uboot", Name: "g1", MAC: "52:54:00:4e:42:01", IP: "10.0.2.15",
			Kernel: "files/kernel", Faults: []string{"missing-kernel"}, Timeout: 90}}
	assert.NilError(t, Write(dir, b, Verdict{Reason: "boot file fetch failed", Stage: "loader", Spans: []Span{{"firmware", 0, 1.5}}}))
	return dir
}

func TestWriteReadPackUnpack(t *testing.T) {
	dir := sample(t)
	b, v, err := Read(dir)
	assert.NilError(t, err)
	assert.Equal(t, b.Spec.Firmware, "uboot")
	assert.Equal(t, b.Lab.IPsec.Rules[0].Port, uint16(2049))
	assert.Equal(t, v.Outcome(), "boot file fetch failed at loader")
	k, err := b.Path(b.Spec.Kernel)
	assert.NilError(t, err)
	assert.Equal(t, k, filepath.Join(dir, "files", "kernel"))

	packed := filepath.Join(t.TempDir(), "b"+Ext)
	assert.NilError(t, Pack(dir, packed))
	b2, v2, done, err := Open(packed)
	assert.NilError(t, err)
	assert.Equal(t, filepath.Base(b2.Dir), "g1-bundle")
	assert.DeepEqual(t, v2, v)
	data, err := os.ReadFile(filepath.Join(b2.Dir, "files", "kernel"))
	assert.NilError(t, err)
	assert.Equal(t, string(data), "kernel bytes")
	done()
	_, err = os.Stat(b2.Dir)
	assert.Assert(t, os.IsNotExist(err), "the unpacked bundle is still there")
}

func TestReadRefusesBadBundles(t *testing.T) {
	dir := sample(t)
	b, _, err := Read(dir)
	assert.NilError(t, err)
	for _, rel := range []string{"../spec.json", "/etc/hostname", "files"} {
		_, err := b.Path(rel)
		assert.Assert(t, errors.Is(err, ErrBad), "path %q: %v", rel, err)
	}
	assert.NilError(t, os.Symlink("/etc/hostname", filepath.Join(dir, "files", "link")))
	_, err = b.Path("files/link")
	assert.Assert(t, errors.Is(err, ErrBad), "a link out of the bundle: %v", err)

	assert.NilError(t, os.WriteFile(filepath.Join(dir, SpecFile), []byte(`{"format": 2}`), 0o644))
	_, _, err = Read(dir)
	assert.Assert(t, errors.Is(err, ErrBad))
	assert.Check(t, is.ErrorContains(err, "format 2"))
	_, _, err = Read(t.TempDir())
	assert.Assert(t, errors.Is(err, ErrBad))
}

// A packed bundle comes from a bug report: entries that climb out, links
// and devices, or more than one folder fail the unpack and leave nothing.
func TestUnpackRefusesHostileArchives(t *testing.T) {
	cases := map[string][]tar.Header{
		"climbs out":  {{Name: "b/", Typeflag: tar.TypeDir, Mode: 0o755}, {Name: "b/../../x", Typeflag: tar.TypeReg, Mode: 0o644}},
		"absolute":    {{Name: "/tmp/x", Typeflag: tar.TypeReg, Mode: 0o644}},
		"symlink":     {{Name: "b/spec.json", Typeflag: tar.TypeSymlink, Linkname: "/etc/passwd"}},
		"device":      {{Name: "b/null", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 3}},
		"two folders": {{Name: "a/x", Typeflag: tar.TypeReg, Mode: 0o644}, {Name: "b/y", Typeflag: tar.TypeReg, Mode: 0o644}},
	}
	for name, entries := range cases {
		t.Run(name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "x"+Ext)
			f, err := os.Create(file)
			assert.NilError(t, err)
			zw, err := zstd.NewWriter(f)
			assert.NilError(t, err)
			tw := tar.NewWriter(zw)
			for _, h := range entries {
				assert.NilError(t, tw.WriteHeader(&h))
			}
			assert.NilError(t, tw.Close())
			assert.NilError(t, zw.Close())
			assert.NilError(t, f.Close())
			parent := t.TempDir()
			_, err = Unpack(file, parent)
			assert.Assert(t, errors.Is(err, ErrBad), "%v", err)
			left, _ := os.ReadDir(parent)
			assert.Equal(t, len(left), 0, "unpack left %v", left)
		})
	}
}

// bomb writes a packed bundle of entries under b/, each of size bytes of
// zeros, and returns its path and packed size.
func bomb(t *testing.T, entries int, size int64) (string, int64) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "bomb"+Ext)
	f, err := os.Create(file)
	assert.NilError(t, err)
	zw, err := zstd.NewWriter(f, zstd.WithEncoderLevel(zstd.SpeedFastest))
	assert.NilError(t, err)
	tw := tar.NewWriter(zw)
	zeros := make([]byte, 1<<20)
	for i := range entries {
		assert.NilError(t, tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("b/%d", i), Typeflag: tar.TypeReg, Mode: 0o644, Size: size}))
		for left := size; left > 0; left -= int64(len(zeros)) {
			_, err := tw.Write(zeros[:min(left, int64(len(zeros)))])
			assert.NilError(t, err)
		}
	}
	assert.NilError(t, tw.Close())
	assert.NilError(t, zw.Close())
	fi, err := f.Stat()
	assert.NilError(t, err)
	assert.NilError(t, f.Close())
	return file, fi.Size()
}

// TestUnpackRefusesBombs: a small bundle that unpacks to 1 GiB, and one
// of countless entries, fail as too large having written no more than the
// bound, and leave nothing behind; a bundle within the bounds unpacks.
func TestUnpackRefusesBombs(t *testing.T) {
	// 1 GiB in one entry, made cheaply: zstd frames decode as one
	// stream, so the tar header's frame is followed by one frame of 1 MiB
	// of zeros, 1,024 times.
	file := filepath.Join(t.TempDir(), "bomb"+Ext)
	enc, err := zstd.NewWriter(nil)
	assert.NilError(t, err)
	var hdr bytes.Buffer
	tw := tar.NewWriter(&hdr)
	assert.NilError(t, tw.WriteHeader(&tar.Header{Name: "b/zeros", Typeflag: tar.TypeReg, Mode: 0o644, Size: 1 << 30}))
	packed := enc.EncodeAll(hdr.Bytes(), nil)
	mib := enc.EncodeAll(make([]byte, 1<<20), nil)
	for range 1024 {
		packed = append(packed, mib...)
	}
	assert.NilError(t, os.WriteFile(file, packed, 0o644))
	assert.Assert(t, len(packed) < 1<<20, "the bomb is %d bytes packed", len(packed))
	parent := t.TempDir()
	_, err = Unpack(file, parent)
	assert.Assert(t, errors.Is(err, ErrTooLarge) && errors.Is(err, ErrBad), "%v", err)
	assert.ErrorContains(t, err, "bundle too large")
	left, _ := os.ReadDir(parent)
	assert.Equal(t, len(left), 0, "unpack left %v", left)

	file, _ = bomb(t, MaxEntries+1, 0)
	_, err = Unpack(file, t.TempDir())
	assert.Assert(t, errors.Is(err, ErrTooLarge), "%v", err)

	file, _ = bomb(t, 3, 4<<20) // 12 MiB of zeros: under the floor
	dir, err := Unpack(file, t.TempDir())
	assert.NilError(t, err)
	fi, err := os.Stat(filepath.Join(dir, "2"))
	assert.NilError(t, err)
	assert.Equal(t, fi.Size(), int64(4<<20))
}

// paxSparse is a tar whose one entry is a GNU sparse 1.0 file (PAX
// records) of realsize bytes, all hole: its data is only the sparse map.
// Go's tar Writer makes no sparse entries, so the blocks are written here.
func paxSparse(realsize int64) []byte {
	rec := func(k, v string) string {
		s := " " + k + "=" + v + "\n"
		n := len(s) + 1
		for len(fmt.Sprint(n))+len(s) != n {
			n = len(fmt.Sprint(n)) + len(s)
		}
		return fmt.Sprint(n) + s
	}
	pad := func(b []byte) []byte { return append(b, make([]byte, (512-len(b)%512)%512)...) }
	block := func(typ byte, name string, size int) []byte {
		var b [512]byte
		copy(b[0:], name)
		copy(b[100:], "0000644\x00")
		copy(b[108:], "0000000\x00")
		copy(b[116:], "0000000\x00")
		copy(b[124:], fmt.Sprintf("%011o\x00", size))
		copy(b[136:], "00000000000\x00")
		b[156] = typ
		copy(b[257:], "ustar\x0000")
		copy(b[148:], "        ")
		sum := 0
		for _, c := range b {
			sum += int(c)
		}
		copy(b[148:], fmt.Sprintf("%06o\x00 ", sum))
		return b[:]
	}
	pax := rec("GNU.sparse.major", "1") + rec("GNU.sparse.minor", "0") + rec("GNU.sparse.name", "b/big") + rec("GNU.sparse.realsize", fmt.Sprint(realsize))
	data := pad([]byte("0\n"))
	out := append(block('x', "b/PaxHeaders/big", len(pax)), pad([]byte(pax))...)
	out = append(append(out, block('0', "b/GNUSparseFile.0/big", len(data))...), data...)
	return append(out, make([]byte, 1024)...)
}

// TestUnpackRefusesSparseEntries: a sparse entry's holes cost the packed
// bundle nothing; a 1 GiB one in a few hundred bytes is refused.
func TestUnpackRefusesSparseEntries(t *testing.T) {
	enc, err := zstd.NewWriter(nil)
	assert.NilError(t, err)
	file := filepath.Join(t.TempDir(), "sparse"+Ext)
	assert.NilError(t, os.WriteFile(file, enc.EncodeAll(paxSparse(1<<30), nil), 0o644))
	parent := t.TempDir()
	_, err = Unpack(file, parent)
	assert.Assert(t, errors.Is(err, ErrBad), "%v", err)
	left, _ := os.ReadDir(parent)
	assert.Equal(t, len(left), 0, "unpack left %v", left)
}
