package archive

import (
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
	"gotest.tools/v3/assert"
)

// gnuCPIO packs the files of dir (relative names, sorted) with GNU cpio in
// newc format: an archive nbh's builder did not write.
func gnuCPIO(t *testing.T, dir string, names ...string) []byte {
	t.Helper()
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("cpio is not installed (scripts/setup installs it)")
	}
	cmd := exec.Command("cpio", "-o", "-H", "newc", "--quiet")
	cmd.Dir = dir
	cmd.Stdin = strings.NewReader(strings.Join(names, "\n") + "\n")
	out, err := cmd.Output()
	assert.NilError(t, err)
	return out
}

func compress(t *testing.T, kind string, b []byte) []byte {
	var out bytes.Buffer
	var w io.WriteCloser
	var err error
	switch kind {
	case "gzip":
		w = gzip.NewWriter(&out)
	case "zstd":
		w, err = zstd.NewWriter(&out)
	case "xz":
		w, err = xz.NewWriter(&out)
	}
	assert.NilError(t, err)
	_, err = w.Write(b)
	assert.NilError(t, err)
	assert.NilError(t, w.Close())
	return out.Bytes()
}

// TestReadArchivesLikeTheKernel: an uncompressed early segment (as CPU
// microcode is) followed by a compressed one, as initramfs-tools and dracut
// write them; every member comes back with its bytes.
func TestReadArchivesLikeTheKernel(t *testing.T) {
	dir := t.TempDir()
	files := map[string]string{
		"kernel/x86/microcode/GenuineIntel.bin": "ucode",
		"etc/modprobe.d/site.conf":              "options foo bar=1\n",
		"usr/lib/modules/6.1/kernel/a.ko":       strings.Repeat("ELF", 5000),
		"init":                                  "#!/bin/sh\n",
	}
	for name, data := range files {
		p := filepath.Join(dir, name)
		assert.NilError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		assert.NilError(t, os.WriteFile(p, []byte(data), 0o644))
	}
	early := gnuCPIO(t, dir, "kernel", "kernel/x86", "kernel/x86/microcode", "kernel/x86/microcode/GenuineIntel.bin")
	main := gnuCPIO(t, dir, "etc", "etc/modprobe.d", "etc/modprobe.d/site.conf", "usr/lib/modules/6.1/kernel/a.ko", "init")
	for _, kind := range []string{"gzip", "zstd"} {
		t.Run(kind, func(t *testing.T) {
			img := append(append(append([]byte(nil), early...), make([]byte, 512)...), compress(t, kind, main)...)
			got := map[string]string{}
			err := Read(context.Background(), bytes.NewReader(img), func(m Member, r io.Reader) error {
				if !m.Regular() {
					return nil
				}
				b, err := io.ReadAll(r)
				got[m.Name] = string(b)
				assert.Equal(t, int64(len(b)), m.Size)
				return err
			})
			assert.NilError(t, err)
			assert.DeepEqual(t, got, files)
		})
	}
	// Compressions it does not undo say so, after what came before: lz4,
	// and xz (its decoder allocates the dictionary the header asks for).
	for _, tail := range [][]byte{{0x02, 0x21, 0x4c, 0x18, 1, 2}, compress(t, "xz", main)} {
		var seen []string
		err := Read(context.Background(), bytes.NewReader(append(append([]byte(nil), early...), tail...)), func(m Member, _ io.Reader) error {
			seen = append(seen, m.Name)
			return nil
		})
		assert.ErrorIs(t, err, ErrCompression)
		assert.Assert(t, len(seen) == 4, "%v", seen)
	}
}

// TestReadBounds: a bomb of zeros stops at MaxUnpacked (here through a
// cancelled context: the same guard), and a cancelled read ends at once.
func TestReadBounds(t *testing.T) {
	var bomb bytes.Buffer
	zw, _ := zstd.NewWriter(&bomb)
	zw.Write(make([]byte, 64<<20))
	zw.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := Read(ctx, bytes.NewReader(bomb.Bytes()), func(Member, io.Reader) error { return nil })
	assert.ErrorIs(t, err, context.Canceled)
	// Zeros alone are padding: read through, quickly, to no members.
	n := 0
	err = Read(context.Background(), bytes.NewReader(bomb.Bytes()), func(Member, io.Reader) error { n++; return nil })
	assert.NilError(t, err)
	assert.Equal(t, n, 0)
}

// FuzzRead: whatever the bytes, Read ends with members or an error; every
// name it reports is relative and clean, and no member yields more data
// than its size.
func FuzzRead(f *testing.F) {
	var buf bytes.Buffer
	b := New()
	b.File("etc/a", []byte("hello"), 0o644)
	b.Symlink("bin/sh", "busybox")
	b.WriteCPIO(&buf)
	f.Add(buf.Bytes())
	var gz bytes.Buffer
	b.WriteGzip(&gz)
	f.Add(gz.Bytes())
	f.Add([]byte("070701" + strings.Repeat("0", 104)))
	f.Fuzz(func(t *testing.T, data []byte) {
		Read(context.Background(), bytes.NewReader(data), func(m Member, r io.Reader) error {
			if strings.HasPrefix(m.Name, "/") || strings.Contains("/"+m.Name+"/", "/../") || m.Name != filepath.Clean(m.Name) {
				t.Fatalf("member name %q", m.Name)
			}
			n, _ := io.Copy(io.Discard, r)
			if n > m.Size {
				t.Fatalf("%s: %d bytes for size %d", m.Name, n, m.Size)
			}
			return nil
		})
	})
}

// TestExpandListStaysInTheRoot: globs and folders expand to the root's
// regular files; a symlink out of the root (absolute, as /etc/resolv.conf
// often is in a root tree) is not followed to the host.
func TestExpandListStaysInTheRoot(t *testing.T) {
	base := t.TempDir()
	root := filepath.Join(base, "root")
	for name, data := range map[string]string{"etc/modprobe.d/a.conf": "a", "etc/modprobe.d/b.conf": "b", "etc/hostname": "h", "usr/share/x/y/z": "z"} {
		p := filepath.Join(root, name)
		assert.NilError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		assert.NilError(t, os.WriteFile(p, []byte(data), 0o644))
	}
	assert.NilError(t, os.WriteFile(filepath.Join(base, "host-secret"), []byte("s"), 0o600))
	assert.NilError(t, os.Symlink(filepath.Join(base, "host-secret"), filepath.Join(root, "etc/leak")))
	list, err := ReadList(strings.NewReader("# comment\n/etc/modprobe.d/*.conf\nconfig etc/hostname\n\n/usr/share/x\n"))
	assert.NilError(t, err)
	got, err := ExpandList(root, list)
	assert.NilError(t, err)
	assert.DeepEqual(t, got, []Tracked{
		{Path: "/etc/hostname", Editable: true}, {Path: "/etc/modprobe.d/a.conf"}, {Path: "/etc/modprobe.d/b.conf"}, {Path: "/usr/share/x/y/z"},
	})
	_, err = ExpandList(root, []Tracked{{Path: "/etc/leak"}})
	assert.ErrorContains(t, err, "no file")
	_, err = ExpandList(root, []Tracked{{Path: "/nope/*"}})
	assert.ErrorContains(t, err, `"/nope/*"`)
}

// TestTrackedCannotReplaceTheArchivesOwn: a root file listed where the
// archive has its own (/init, busybox) is refused, not swapped in.
func TestTrackedCannotReplaceTheArchivesOwn(t *testing.T) {
	root := t.TempDir()
	assert.NilError(t, os.MkdirAll(filepath.Join(root, "bin"), 0o755))
	assert.NilError(t, os.WriteFile(filepath.Join(root, "bin/busybox"), []byte("the root's"), 0o755))
	own := filepath.Join(t.TempDir(), "busybox")
	assert.NilError(t, os.WriteFile(own, []byte("nbh's"), 0o755))
	_, err := Build(Spec{Root: root, Files: map[string]string{"bin/busybox": own}, Tracked: []Tracked{{Path: "/bin/busybox"}}}, t.TempDir())
	assert.ErrorContains(t, err, "would replace the archive's own")
}
