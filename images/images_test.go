package images

import (
	"context"
	"errors"
	"fmt"
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
	c.PinsOverride = map[string]PinSet{"amd64": {Arch: "amd64", Packages: map[string]Pin{"busybox-static": {Version: "1:1.0-1", SHA256: "abc123", Size: 10}}}}
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
	p, err := c.Path(context.Background(), "amd64", fileBusybox)
	assert.NilError(t, err)
	assert.Equal(t, p, filepath.Join(dir, "bin/busybox"))
}

// A partial entry (no stamp) or a stamp of another .deb is fetched again.
func TestPartialOrCorruptEntryIsFetchedAgain(t *testing.T) {
	for _, stamp := range []string{"", "deadbeef"} {
		c, _ := fakeEntry(t, stamp)
		t.Setenv("PATH", t.TempDir())
		_, err := c.Path(context.Background(), "amd64", fileBusybox)
		assert.Assert(t, errors.Is(err, ErrMissingTool), "stamp %q: want a fetch attempt, got %v", stamp, err)
	}
}

func TestUnknownArch(t *testing.T) {
	err := FetchAll(context.Background(), &Cache{Dir: t.TempDir()}, "loong64")
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
	c.PinsOverride = map[string]PinSet{"amd64": {Arch: "amd64", Packages: map[string]Pin{"linktest": {Version: "1.0-1", SHA256: sum}}}}
	dir := c.pkgDir("linktest", "1.0-1", "amd64")
	assert.NilError(t, unpack(context.Background(), deb, sum, dir))
	t.Setenv("PATH", t.TempDir()+":"+os.Getenv("PATH")) // offline: a complete entry needs no apt

	for rel, want := range map[string]string{
		"usr/lib/ipxe/ipxe.efi":   "package efi",
		"usr/lib/ipxe/ipxe.lkrn":  "package lkrn",
		"usr/lib/ipxe/chain":      "package efi",
		"usr/share/ipxe/ipxe.efi": "package efi",
	} {
		p, err := c.Path(context.Background(), "amd64", File{Package: "linktest", Path: rel})
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
		_, err := c.Path(context.Background(), "amd64", File{Package: "linktest", Path: rel})
		assert.ErrorContains(t, err, want, rel)
	}
}

// The committed pins name every package the chains need, with a version and
// a checksum, and the kernel they name is pinned itself.
func TestCommittedPinsAreComplete(t *testing.T) {
	for _, arch := range Arches() {
		s, err := Pinned(arch)
		assert.NilError(t, err)
		assert.Equal(t, s.Arch, arch)
		assert.Assert(t, strings.HasPrefix(s.Kernel, "linux-image-"), s.Kernel)
		names := []string{s.Kernel}
		for _, f := range archFiles[arch] {
			names = append(names, f.key())
		}
		for _, n := range names {
			p, ok := s.Packages[n]
			assert.Assert(t, ok, "%s: %s is not pinned", arch, n)
			assert.Assert(t, p.Version != "" && len(p.SHA256) == 64 && p.Size > 0, "%s: %s: %+v", arch, n, p)
		}
	}
}

// A package nothing pinned is a clear error, not a silent resolve.
func TestUnpinnedPackage(t *testing.T) {
	c, _ := fakeEntry(t, "abc123")
	_, err := c.Path(context.Background(), "amd64", File{Package: "not-a-pinned-package", Path: "x"})
	assert.ErrorContains(t, err, "not-a-pinned-package (amd64) is not pinned in images/pins-amd64.json")
}

// localArchive serves deb from a flat apt archive in a folder (file: URI),
// indexed as name at version; it returns a sources.list for it.
func localArchive(t *testing.T, deb, name, version string) string {
	t.Helper()
	dir := t.TempDir()
	data, err := os.ReadFile(deb)
	assert.NilError(t, err)
	assert.NilError(t, os.WriteFile(filepath.Join(dir, "p.deb"), data, 0o644))
	sum, err := fsutil.SHA256File(deb)
	assert.NilError(t, err)
	idx := fmt.Sprintf("Package: %s\nVersion: %s\nArchitecture: all\nFilename: ./p.deb\nSize: %d\nSHA256: %s\nDescription: test\n\n", name, version, len(data), sum)
	assert.NilError(t, os.WriteFile(filepath.Join(dir, "Packages"), []byte(idx), 0o644))
	list := filepath.Join(t.TempDir(), "sources.list")
	assert.NilError(t, os.WriteFile(list, []byte("deb [trusted=yes] file:"+dir+" ./\n"), 0o644))
	return list
}

// A pinned package is fetched through apt, checked and unpacked; a pin the
// archive no longer serves is an error naming the package and version.
func TestFetchPinnedAndPinGone(t *testing.T) {
	if _, err := exec.LookPath("apt-get"); err != nil {
		t.Skip("apt-get not installed")
	}
	deb := debWithLinks(t)
	sum, err := fsutil.SHA256File(deb)
	assert.NilError(t, err)
	var log strings.Builder
	c := &Cache{Dir: t.TempDir(), Log: &log, sourceList: localArchive(t, deb, "linktest", "1.0-1")}
	c.PinsOverride = map[string]PinSet{"amd64": {Arch: "amd64", Packages: map[string]Pin{"linktest": {Version: "1.0-1", SHA256: sum}}}}
	p, err := c.Path(context.Background(), "amd64", File{Package: "linktest", Path: "usr/lib/ipxe/ipxe.efi"})
	assert.NilError(t, err, log.String())
	got, _ := os.ReadFile(p)
	assert.Equal(t, string(got), "package efi")

	c2 := &Cache{Dir: t.TempDir(), Log: &log, sourceList: c.sourceList}
	c2.PinsOverride = map[string]PinSet{"amd64": {Arch: "amd64", Packages: map[string]Pin{"linktest": {Version: "0.9-1", SHA256: sum}}}}
	_, err = c2.Path(context.Background(), "amd64", File{Package: "linktest", Path: "usr/lib/ipxe/ipxe.efi"})
	assert.Assert(t, errors.Is(err, ErrPinGone), "%v", err)
	assert.ErrorContains(t, err, "pinned package linktest 0.9-1 (amd64, bookworm) is no longer served")

	// Resolving pins what the archive serves now.
	c3 := &Cache{Dir: t.TempDir(), Log: &log, sourceList: c.sourceList}
	assert.NilError(t, c3.update(context.Background(), source{arch: "amd64", suite: "bookworm"}, true))
	pin, err := c3.resolve(context.Background(), source{arch: "amd64", suite: "bookworm"}, "linktest")
	assert.NilError(t, err)
	assert.DeepEqual(t, pin, Pin{Version: "1.0-1", SHA256: sum, Size: pin.Size})
}

// TestHostArchives: the host's Debian archives out of its apt sources as
// apt-get indextargets lists them, whatever else the host reads from.
func TestHostArchives(t *testing.T) {
	const (
		chrome   = "deb Packages stable https://dl.example.com/linux/chrome/deb/\n"
		bookworm = "deb Packages bookworm http://mirror.example/debian/\n" +
			"deb DEP-11 bookworm http://mirror.example/debian/\n" +
			"deb Packages bookworm-updates http://mirror.example/debian/\n" +
			"deb Packages bookworm-security http://security.example/debian-security/\n"
	)
	for _, c := range []struct {
		name, out, codename string
		want                archives
		err                 string
	}{
		{"debian", bookworm, "bookworm", archives{Main: "http://mirror.example/debian/", Updates: true, Security: "http://security.example/debian-security/"}, ""},
		// A third-party "stable" listed first is not Debian's archive.
		{"third party first", chrome + bookworm, "bookworm", archives{Main: "http://mirror.example/debian/", Updates: true, Security: "http://security.example/debian-security/"}, ""},
		// A local mirror with neither -updates nor -security.
		{"bare mirror", "deb Packages trixie http://local/debian/\n", "trixie", archives{Main: "http://local/debian/"}, ""},
		// Sources written with the alias, not the codename.
		{"alias", "deb Packages stable http://mirror.example/debian/\ndeb Packages stable-security http://sec.example/debian-security/\n", "trixie",
			archives{Main: "http://mirror.example/debian/", Security: "http://sec.example/debian-security/"}, ""},
		// Only a third party's "stable": no Debian here.
		{"no debian", chrome, "noble", archives{}, "name no Debian release"},
		// Another distribution: no Debian codename (debianCodename).
		{"ubuntu", "deb Packages noble http://archive.example/ubuntu/\n", "", archives{}, "NBH_DEBIAN_ARCHIVE"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := parseIndexTargets(c.out, c.codename)
			if c.err != "" {
				assert.ErrorContains(t, err, c.err)
				return
			}
			assert.NilError(t, err)
			assert.DeepEqual(t, got, c.want)
		})
	}
}

// TestNamedArchives: on a host without Debian's sources the archives are
// named; the security archive must be named too (or "none"), and each must
// stay one field of a sources line.
func TestNamedArchives(t *testing.T) {
	t.Setenv("NBH_DEBIAN_ARCHIVE", "http://mirror.example/debian/")
	t.Setenv("NBH_DEBIAN_SECURITY", "")
	_, err := hostArchives(context.Background())
	assert.ErrorContains(t, err, "set NBH_DEBIAN_SECURITY too")
	t.Setenv("NBH_DEBIAN_SECURITY", "none")
	a, err := hostArchives(context.Background())
	assert.NilError(t, err)
	assert.DeepEqual(t, a, archives{Main: "http://mirror.example/debian/", Updates: true})
	assert.Equal(t, a.list("/k.gpg", "bookworm"), "deb [signed-by=/k.gpg] http://mirror.example/debian/ bookworm main\ndeb [signed-by=/k.gpg] http://mirror.example/debian/ bookworm-updates main\n")
	t.Setenv("NBH_DEBIAN_ARCHIVE", "http://mirror.example/debian/ bookworm main\ndeb http://evil/")
	_, err = hostArchives(context.Background())
	assert.ErrorContains(t, err, "not an archive URI")
}
