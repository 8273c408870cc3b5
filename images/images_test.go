package images

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/internal/fsutil"
)

// fakeEntry makes a cache that pins pkg and holds its unpacked folder.
func fakeEntry(t *testing.T, stamp string) (*Cache, string) {
	c := &Cache{Dir: t.TempDir(), Log: os.Stderr}
	pins := map[string]pin{"busybox-static": {Version: "1:1.0-1", SHA256: "abc123", Size: 10}}
	b, _ := json.Marshal(pins)
	assert.NilError(t, os.WriteFile(filepath.Join(c.Dir, "lock-amd64.json"), b, 0o644))
	dir := c.pkgDir("busybox-static", "1:1.0-1", "amd64")
	assert.NilError(t, os.MkdirAll(filepath.Join(dir, "bin"), 0o755))
	assert.NilError(t, os.WriteFile(filepath.Join(dir, "bin/busybox"), []byte("bb"), 0o755))
	if stamp != "" {
		assert.NilError(t, os.WriteFile(filepath.Join(dir, ".complete"), []byte(stamp+"\n"), 0o644))
	}
	return c, dir
}

// A complete entry is used without apt: with no apt-get on PATH at all.
func TestCompleteEntryIsOffline(t *testing.T) {
	c, dir := fakeEntry(t, "abc123")
	t.Setenv("PATH", t.TempDir())
	p, err := c.Path(context.Background(), "amd64", Busybox)
	assert.NilError(t, err)
	assert.Equal(t, p, filepath.Join(dir, "bin/busybox"))
}

// A partial entry (no stamp) or a stamp of another .deb is fetched again.
func TestPartialOrCorruptEntryIsFetchedAgain(t *testing.T) {
	for _, stamp := range []string{"", "deadbeef"} {
		c, _ := fakeEntry(t, stamp)
		t.Setenv("PATH", t.TempDir())
		_, err := c.Path(context.Background(), "amd64", Busybox)
		assert.Assert(t, errors.Is(err, ErrMissingTool), "stamp %q: want a fetch attempt, got %v", stamp, err)
	}
}

func TestUnknownArch(t *testing.T) {
	err := FetchAll(context.Background(), &Cache{Dir: t.TempDir()}, "riscv64")
	assert.ErrorContains(t, err, "unknown architecture")
}

// debWithLinks builds a real .deb (dpkg-deb -b) shaped like Debian's ipxe:
// usr/lib/ipxe/ipxe.efi is an absolute link to /boot/ipxe.efi, which the
// package itself holds; plus a relative link inside, links that leave the
// package, and an absolute link to a file the host has but the package not.
func debWithLinks(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("dpkg-deb"); err != nil {
		t.Skip("dpkg-deb not installed")
	}
	src := t.TempDir()
	mk := func(rel, data string) {
		p := filepath.Join(src, rel)
		assert.NilError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		assert.NilError(t, os.WriteFile(p, []byte(data), 0o644))
	}
	link := func(rel, target string) {
		p := filepath.Join(src, rel)
		assert.NilError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		assert.NilError(t, os.Symlink(target, p))
	}
	mk("DEBIAN/control", "Package: linktest\nVersion: 1.0-1\nArchitecture: all\nMaintainer: nbh <nbh@localhost>\nDescription: links\n")
	mk("boot/ipxe.efi", "package efi")
	mk("usr/lib/ipxe/real.lkrn", "package lkrn")
	link("usr/lib/ipxe/ipxe.efi", "/boot/ipxe.efi")
	link("usr/lib/ipxe/ipxe.lkrn", "real.lkrn")
	link("usr/lib/ipxe/chain", "ipxe.efi")  // a link to a link
	link("usr/share/ipxe", "/usr/lib/ipxe") // a linked folder
	link("usr/lib/ipxe/escape", "../../../../etc/hostname")
	link("usr/lib/ipxe/hostfile", "/etc/hostname") // the host has it, the package not
	link("usr/lib/ipxe/loop", "loop")
	deb := filepath.Join(t.TempDir(), "linktest.deb")
	out, err := exec.Command("dpkg-deb", "--root-owner-group", "-b", src, deb).CombinedOutput()
	assert.NilError(t, err, "%s", out)
	return deb
}

// Links inside a cached package resolve inside it, never on the host.
func TestPackageLinksResolveInsideThePackage(t *testing.T) {
	deb := debWithLinks(t)
	sum, err := fsutil.SHA256File(deb)
	assert.NilError(t, err)
	c := &Cache{Dir: t.TempDir(), Log: os.Stderr}
	b, _ := json.Marshal(map[string]pin{"linktest": {Version: "1.0-1", SHA256: sum}})
	assert.NilError(t, os.WriteFile(filepath.Join(c.Dir, "lock-amd64.json"), b, 0o644))
	dir := c.pkgDir("linktest", "1.0-1", "amd64")
	assert.NilError(t, unpack(context.Background(), deb, sum, dir))
	t.Setenv("PATH", t.TempDir()+":"+os.Getenv("PATH")) // offline: a complete entry needs no apt

	for rel, want := range map[string]string{
		"usr/lib/ipxe/ipxe.efi":   "package efi",
		"usr/lib/ipxe/ipxe.lkrn":  "package lkrn",
		"usr/lib/ipxe/chain":      "package efi",
		"usr/share/ipxe/ipxe.efi": "package efi",
	} {
		p, err := c.Path(context.Background(), "amd64", File{"linktest", rel})
		assert.NilError(t, err, rel)
		assert.Assert(t, strings.HasPrefix(p, dir+"/"), "%s resolved to %s, outside %s", rel, p, dir)
		got, err := os.ReadFile(p)
		assert.NilError(t, err)
		assert.Equal(t, string(got), want, rel)
	}
	for rel, want := range map[string]string{
		"usr/lib/ipxe/escape":   "package linktest (amd64): usr/lib/ipxe/escape: leads outside the package",
		"usr/lib/ipxe/hostfile": "package linktest (amd64) has no usr/lib/ipxe/hostfile",
		"usr/lib/ipxe/loop":     "too many symbolic links",
		"usr/lib/ipxe/absent":   "package linktest (amd64) has no usr/lib/ipxe/absent",
	} {
		_, err := c.Path(context.Background(), "amd64", File{"linktest", rel})
		assert.ErrorContains(t, err, want, rel)
	}
}
