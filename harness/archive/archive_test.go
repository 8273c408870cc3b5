package archive

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"gotest.tools/v3/assert"
)

func sample(t *testing.T) *Builder {
	b := New()
	assert.NilError(t, b.File("init", []byte("#!/bin/sh\necho hi\n"), 0o755))
	assert.NilError(t, b.File("etc/conf", []byte("a=1\n"), 0o644))
	assert.NilError(t, b.Symlink("bin/sh", "busybox"))
	assert.NilError(t, b.File("bin/busybox", bytes.Repeat([]byte{0x7f, 'E', 'L', 'F'}, 1000), 0o755))
	assert.NilError(t, b.Dir("proc", 0o555))
	assert.NilError(t, b.CharDev("dev/console", 0o600, 5, 1))
	return b
}

func TestReproducible(t *testing.T) {
	var a, b bytes.Buffer
	assert.NilError(t, sample(t).WriteGzip(&a))
	// Same entries added in another order.
	c := New()
	c.Dir("proc", 0o555)
	c.CharDev("dev/console", 0o600, 5, 1)
	c.File("bin/busybox", bytes.Repeat([]byte{0x7f, 'E', 'L', 'F'}, 1000), 0o755)
	c.Symlink("bin/sh", "busybox")
	c.File("etc/conf", []byte("a=1\n"), 0o644)
	c.File("init", []byte("#!/bin/sh\necho hi\n"), 0o755)
	assert.NilError(t, c.WriteGzip(&b))
	assert.Assert(t, bytes.Equal(a.Bytes(), b.Bytes()), "two builds of the same entries differ")
}

// TestSystemCpioReadsIt unpacks the archive with the system's cpio and
// checks every file against the manifest inside it.
func TestSystemCpioReadsIt(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Fatal("cpio is not installed (Debian package cpio; make setup installs it)")
	}
	var raw bytes.Buffer
	assert.NilError(t, sample(t).WriteCPIO(&raw))
	dir := t.TempDir()
	list := exec.Command("cpio", "-itv")
	list.Stdin = bytes.NewReader(raw.Bytes())
	out, err := list.CombinedOutput()
	assert.NilError(t, err, "%s", out)
	assert.Assert(t, strings.Contains(string(out), "bin/sh -> busybox"), "%s", out)
	assert.Assert(t, strings.Contains(string(out), "crw-------"), "no character device in %s", out)

	x := exec.Command("cpio", "-id", "--no-absolute-filenames", "--nonmatching", "dev/*")
	x.Dir = dir
	x.Stdin = bytes.NewReader(raw.Bytes())
	out, err = x.CombinedOutput()
	assert.NilError(t, err, "%s", out)

	mb, err := os.ReadFile(filepath.Join(dir, ManifestPath))
	assert.NilError(t, err)
	var m Manifest
	assert.NilError(t, json.Unmarshal(mb, &m))
	assert.Equal(t, len(m.Files), 3)
	for _, f := range m.Files {
		b, err := os.ReadFile(filepath.Join(dir, f.Path))
		assert.NilError(t, err)
		sum := sha256.Sum256(b)
		assert.Equal(t, hex.EncodeToString(sum[:]), f.SHA256, f.Path)
		assert.Equal(t, int64(len(b)), f.Size, f.Path)
	}
	fi, err := os.Stat(filepath.Join(dir, "init"))
	assert.NilError(t, err)
	assert.Equal(t, fi.Mode().Perm(), os.FileMode(0o755))
}

func TestBadPaths(t *testing.T) {
	b := New()
	assert.ErrorContains(t, b.File("", nil, 0o644), "bad path")
	// Paths are cleaned into the archive: no entry can point above its root.
	assert.NilError(t, b.File("../../etc/x", []byte("x"), 0o644))
	assert.Equal(t, b.Manifest().Files[0].Path, "/etc/x")
}
