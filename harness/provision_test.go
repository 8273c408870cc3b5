package harness

import (
	"bytes"
	"context"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/ipsec"
)

// A replay with the recorded seed, name and MAC makes the same ESP SPIs and
// keys and the same CHAP secret; another seed makes others. Provisioning
// only: no guest boots, but the archive is built from the image cache.
func TestReplayMakesTheSameSecrets(t *testing.T) {
	if testing.Short() {
		t.Skip("builds boot archives from the image cache; skipped with -short")
	}
	secrets := func(seed string) (esp []byte, chap string) {
		l, err := New(Options{IPsec: ipsec.Required(), Seed: seed})
		assert.NilError(t, err)
		defer l.Close()
		g, err := l.Provision(context.Background(), Spec{Arch: "amd64", Firmware: "seabios-ipxe", Root: RootISCSI, CHAP: true,
			Name: "g7", MAC: "52:54:00:4e:42:07"})
		assert.NilError(t, err)
		assert.Assert(t, g.espConf != nil && g.chap != nil)
		return g.espConf, g.chap.Secret
	}
	esp1, chap1 := secrets("recorded")
	esp2, chap2 := secrets("recorded")
	esp3, chap3 := secrets("another")
	assert.Assert(t, bytes.Equal(esp1, esp2), "the replay's ESP keys differ:\n%s\n%s", esp1, esp2)
	assert.Equal(t, chap1, chap2)
	assert.Assert(t, !bytes.Equal(esp1, esp3))
	assert.Assert(t, chap1 != chap3)
}

// A boot that fails after provisioning began gives back what it set up:
// the export, the SAs, the private folder (the guest was never registered,
// so Lab.Close would not find them).
func TestFailedProvisionLeavesNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a root from the image cache; skipped with -short")
	}
	l, err := New(Options{IPsec: ipsec.Required()})
	assert.NilError(t, err)
	defer l.Close()
	_, err = l.Provision(context.Background(), Spec{Arch: "amd64", Firmware: "seabios-ipxe", Root: RootNFS,
		Name: "g1", Kernel: "/nonexistent/vmlinuz", Initrd: "/nonexistent/initrd"})
	assert.ErrorContains(t, err, "nonexistent")
	assert.Assert(t, !l.nfs.Exported(NFSExport, "10.0.2.15"), "the NFS export outlived the failed boot")
	assert.Assert(t, l.esp.Peer(netip.MustParseAddr("10.0.2.15")) == nil, "the SAs outlived the failed boot")
	_, err = os.Stat(filepath.Join(l.work, "guest-g1"))
	assert.Assert(t, os.IsNotExist(err), "the private folder outlived the failed boot")
}

// A guest's boot files are served to that guest only: another guest asking
// for its loader script, archive or root files is refused (and recorded).
func TestBootFilesOnlyToTheirGuest(t *testing.T) {
	if testing.Short() {
		t.Skip("builds boot archives from the image cache; skipped with -short")
	}
	l, err := New(Options{})
	assert.NilError(t, err)
	defer l.Close()
	var gs []*Guest
	for _, name := range []string{"g1", "g2"} {
		g, err := l.Provision(context.Background(), Spec{Arch: "arm64", Firmware: "uboot", Root: RootNFS, Name: name})
		assert.NilError(t, err)
		gs = append(gs, g)
	}
	g1, g2 := gs[0], gs[1]
	mac1 := strings.ReplaceAll(g1.MAC.String(), ":", "-")
	for _, name := range []string{"g1/vmlinuz", "g1/initrd.img", "g1/files/etc/nbh/boot.conf", "pxelinux.cfg/01-" + mac1} {
		f, err := l.open(name, g1.IP)
		assert.NilError(t, err, "%s to its own guest", name)
		f.Close()
		_, err = l.open(name, g2.IP)
		assert.ErrorIs(t, err, fs.ErrPermission, "%s to another guest", name)
	}
	refused := 0
	for _, e := range l.tl.Events("") {
		if e.Kind == "refused" {
			refused++
		}
	}
	assert.Equal(t, refused, 4)
	// Ownership goes by the name the servers' os.Root resolves: other
	// spellings of g1's files are g1's too.
	for _, name := range []string{"./g1/vmlinuz", "g1//initrd.img", "/g2/../g1/vmlinuz", "pxelinux.cfg/./01-" + mac1, "x/../g1/files/etc/nbh/boot.conf"} {
		f, err := l.open(name, g1.IP)
		assert.NilError(t, err, "%s to its own guest", name)
		f.Close()
		_, err = l.open(name, g2.IP)
		assert.ErrorIs(t, err, fs.ErrPermission, "%s to another guest", name)
	}
	// Each U-Boot guest's own script was written, naming no other guest.
	for _, g := range gs {
		b, err := os.ReadFile(filepath.Join(l.srv, g.Name, "boot.scr.uimg"))
		assert.NilError(t, err)
		for _, o := range gs {
			if o != g {
				assert.Assert(t, !strings.Contains(string(b), o.MAC.String()), "%s's script names %s", g.Name, o.Name)
			}
		}
	}
	// QEMU's user-mode TFTP root for g1 links its own files and the
	// shared ones only.
	assert.NilError(t, g1.userNetRoot())
	tftp := filepath.Join(g1.private, "tftp")
	_, err = os.Stat(filepath.Join(tftp, "g1", "vmlinuz"))
	assert.NilError(t, err)
	_, err = os.Lstat(filepath.Join(tftp, "g2"))
	assert.Assert(t, os.IsNotExist(err), "g1's TFTP root has g2's folder")
	pxe, err := os.ReadDir(filepath.Join(tftp, "pxelinux.cfg"))
	assert.NilError(t, err)
	assert.Equal(t, len(pxe), 1)
	assert.Equal(t, pxe[0].Name(), "01-"+mac1)
	script, err := filepath.EvalSymlinks(filepath.Join(tftp, "boot.scr.uimg"))
	assert.NilError(t, err)
	assert.Equal(t, script, filepath.Join(l.srv, "g1", "boot.scr.uimg"))
	// A guest being provisioned owns its files already.
	assert.NilError(t, os.MkdirAll(filepath.Join(l.srv, "g9"), 0o755))
	assert.NilError(t, os.WriteFile(filepath.Join(l.srv, "g9", "boot.ipxe"), []byte("secret"), 0o644))
	l.mu.Lock()
	l.provisioning["g9"] = &Guest{Name: "g9", MAC: net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 9}}
	l.mu.Unlock()
	_, err = l.open("g9/boot.ipxe", g1.IP)
	assert.ErrorIs(t, err, fs.ErrPermission, "a guest's file while it is being provisioned")

	// U-Boot asks for boot.scr.uimg by that one name: each guest gets its
	// own script (with its own command line, never another's); an address
	// with no guest, the lab's plain one.
	for _, g := range gs {
		assert.NilError(t, os.WriteFile(filepath.Join(l.srv, g.Name, "boot.scr.uimg"), []byte("script of "+g.Name), 0o644))
	}
	for addr, want := range map[string]string{g1.IP: "script of g1", g2.IP: "script of g2", "10.0.2.99": ""} {
		f, err := l.open("./boot.scr.uimg", addr)
		assert.NilError(t, err)
		b, err := io.ReadAll(f)
		f.Close()
		assert.NilError(t, err)
		if want == "" {
			assert.Assert(t, !strings.Contains(string(b), "script of"), "%s got a guest's script", addr)
		} else {
			assert.Equal(t, string(b), want, "%s", addr)
		}
	}
}

// TestServeTreeUnderTheLab: a tree of the user's (Options.Serve) is served
// where the lab has no file of its own, also inside a guest's folder (what
// a loader fetches beside itself), never to another guest, and never
// outside the tree.
func TestServeTreeUnderTheLab(t *testing.T) {
	if testing.Short() {
		t.Skip("builds boot archives from the image cache; skipped with -short")
	}
	base := t.TempDir()
	tree := filepath.Join(base, "tree")
	for name, data := range map[string]string{"menu.ipxe": "menu", "grubx64.efi": "grub", "vmlinuz": "not the lab's", "g1/own": "g1's"} {
		p := filepath.Join(tree, name)
		assert.NilError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		assert.NilError(t, os.WriteFile(p, []byte(data), 0o644))
	}
	assert.NilError(t, os.WriteFile(filepath.Join(base, "secret"), []byte("secret"), 0o600))
	assert.NilError(t, os.Symlink(filepath.Join(base, "secret"), filepath.Join(tree, "leak")))
	l, err := New(Options{Serve: tree})
	assert.NilError(t, err)
	defer l.Close()
	var gs []*Guest
	for _, name := range []string{"g1", "g2"} {
		g, err := l.Provision(context.Background(), Spec{Arch: "amd64", Firmware: "seabios-ipxe", Name: name})
		assert.NilError(t, err)
		gs = append(gs, g)
	}
	g1, g2 := gs[0], gs[1]
	read := func(name, addr string) (string, error) {
		f, err := l.open(name, addr)
		if err != nil {
			return "", err
		}
		defer f.Close()
		b := make([]byte, f.Size())
		_, err = f.ReadAt(b, 0)
		return string(b), err
	}
	for name, want := range map[string]string{"menu.ipxe": "menu", "g1/grubx64.efi": "grub", "g1/own": "g1's"} {
		got, err := read(name, g1.IP)
		assert.NilError(t, err, name)
		assert.Equal(t, got, want, name)
	}
	got, err := read("g1/vmlinuz", g1.IP)
	assert.NilError(t, err)
	assert.Assert(t, got != "not the lab's", "the tree's file won over the lab's own")
	for _, name := range []string{"g1/grubx64.efi", "g1/own"} {
		_, err := read(name, g2.IP)
		assert.ErrorIs(t, err, fs.ErrPermission, "%s to another guest", name)
	}
	// Nor through the fallback: g2's name inside g2's own folder, or a
	// pxelinux config named for g1's MAC.
	mac1 := "pxelinux.cfg/01-" + strings.ReplaceAll(g1.MAC.String(), ":", "-")
	assert.NilError(t, os.MkdirAll(filepath.Join(tree, "pxelinux.cfg"), 0o755))
	assert.NilError(t, os.WriteFile(filepath.Join(tree, mac1), []byte("g1's config"), 0o644))
	for _, name := range []string{"g2/g1/own", "g2/" + mac1} {
		got, err := read(name, g2.IP)
		assert.ErrorIs(t, err, fs.ErrPermission, "%s to g2: %q", name, got)
	}
	// A FIFO in the tree is refused, not waited on.
	assert.NilError(t, syscall.Mkfifo(filepath.Join(tree, "fifo"), 0o644))
	done := make(chan error, 1)
	go func() { _, err := read("fifo", g1.IP); done <- err }()
	select {
	case err := <-done:
		assert.ErrorContains(t, err, "not a regular file")
	case <-time.After(5 * time.Second):
		t.Fatal("opening a FIFO of the served tree blocked")
	}
	for _, name := range []string{"leak", "../secret", "g1/../../secret"} {
		got, err := read(name, g1.IP)
		assert.Assert(t, err != nil && got != "secret", "%s: %q %v", name, got, err)
	}
}

// TestShimGRUBConfigOnlyToItsGuest: Debian's signed GRUB asks for its
// configuration by names that are the same for every guest; each guest
// gets its own (its command line, its kernel), never another's, and an
// address with no guest gets none.
func TestShimGRUBConfigOnlyToItsGuest(t *testing.T) {
	if testing.Short() {
		t.Skip("builds boot archives from the image cache; skipped with -short")
	}
	l, err := New(Options{})
	assert.NilError(t, err)
	defer l.Close()
	var gs []*Guest
	for _, name := range []string{"g1", "g2"} {
		g, err := l.Provision(context.Background(), Spec{Arch: "amd64", Firmware: "ovmf-shim", Name: name})
		assert.NilError(t, err)
		gs = append(gs, g)
	}
	for _, name := range []string{"/grub/x86_64-efi/grub.cfg", "grub/grub.cfg", "grub//grub.cfg", "grub/arm64-efi/grub.cfg"} {
		for _, g := range gs {
			f, err := l.open(name, g.IP)
			assert.NilError(t, err, "%s to %s", name, g.Name)
			b, err := io.ReadAll(f)
			f.Close()
			assert.NilError(t, err)
			assert.Assert(t, strings.Contains(string(b), "/"+g.Name+"/vmlinuz"), "%s to %s: %s", name, g.Name, b)
			for _, o := range gs {
				if o != g {
					assert.Assert(t, !strings.Contains(string(b), "/"+o.Name+"/"), "%s to %s names %s: %s", name, g.Name, o.Name, b)
				}
			}
		}
		_, err := l.open(name, "10.0.2.99")
		assert.ErrorIs(t, err, fs.ErrNotExist, "%s to an address with no guest", name)
	}
	// And each guest's copy by its own name, to it only.
	_, err = l.open("g1/"+shimGRUBConfig, gs[1].IP)
	assert.ErrorIs(t, err, fs.ErrPermission)
}
