package harness

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/archive"
	"nbh.dev/nbh/harness/qemu"
)

func TestChainsDriveTheirNICs(t *testing.T) {
	if _, err := exec.LookPath(qemu.Binary("amd64")); err != nil {
		t.Skip("qemu-system-x86_64 is not installed: which ROM it loads for a card is asked of it")
	}
	drives := func(arch, fw, nic string, rom bool) error {
		c, err := LookupChain(arch, fw)
		assert.NilError(t, err)
		return c.Drives(nic, rom)
	}
	// Through the NIC's iPXE ROM, and with no firmware at all: any model.
	for _, nic := range []string{"virtio", "e1000", "e1000e", "rtl8139", "vmxnet3", "pcnet", "ne2k_pci", "i82559er"} {
		assert.NilError(t, drives("amd64", "seabios-ipxe", nic, false))
		assert.NilError(t, drives("arm64", "direct", nic, false))
	}
	// Under UEFI only through a ROM with an EFI driver: QEMU 7.2 and 10
	// both load efi-ne2k_pci.rom for ne2k_pci and the legacy-only
	// pxe-eepro100.rom for i82559er (what the ROM files hold is checked
	// against their headers in qemu's TestNICROMs).
	for _, nic := range []string{"virtio", "e1000", "e1000e", "rtl8139", "vmxnet3", "pcnet", "ne2k_pci"} {
		assert.NilError(t, drives("amd64", "ovmf-ipxe", nic, false))
	}
	assert.ErrorContains(t, drives("amd64", "ovmf-ipxe", "i82559er", false), "(pxe-eepro100.rom) holds no EFI driver")
	// OVMF's and AAVMF's own network stack has a virtio driver only.
	assert.ErrorContains(t, drives("amd64", "ovmf-pxe", "e1000", false), "has no driver for it")
	assert.ErrorContains(t, drives("arm64", "aavmf-http", "e1000", false), "has no driver for it")
	assert.NilError(t, drives("amd64", "ovmf-pxe", "e1000", true), "the user's ROM brings the driver")
	assert.NilError(t, drives("arm64", "uboot", "e1000", false))
	assert.ErrorContains(t, drives("arm64", "uboot", "rtl8139", false), "it drives virtio, e1000")
	assert.ErrorContains(t, drives("amd64", "seabios-ipxe", "tulip3000", false), "want one of")
}

func TestUserFilesFitTheChain(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "boot.ipxe")
	assert.NilError(t, os.WriteFile(script, []byte("#!ipxe\n"), 0o644))
	check := func(fw string, s Spec) error {
		c, err := LookupChain(map[bool]string{true: "arm64", false: "amd64"}[strings.HasPrefix(fw, "aavmf") || fw == "uboot"], fw)
		assert.NilError(t, err)
		return c.CheckUserFiles(s)
	}
	assert.ErrorContains(t, check("seabios-ipxe", Spec{Loader: script}), "is handed no loader binary")
	assert.ErrorContains(t, check("ovmf-pxe", Spec{Loader: script}), "not an EFI (PE/COFF) binary")
	assert.ErrorContains(t, check("seabios-ipxe", Spec{FirmwareCode: script}), "not UEFI")
	assert.ErrorContains(t, check("ovmf-http", Spec{FirmwareCode: script}), "UEFI firmware image")
	assert.ErrorContains(t, check("aavmf-grub", Spec{FirmwareVars: script}), "without a variable store flash")
	assert.ErrorContains(t, check("ovmf-ipxe", Spec{BIOS: script}), "boots no BIOS of its own")
	assert.NilError(t, check("uboot", Spec{BIOS: script}))
	assert.ErrorContains(t, check("seabios-ipxe", Spec{NICROM: script}), "not a PCI option ROM")

	// Sizes, as QEMU 7.2 holds firmware files to them.
	fv := func(size int) string {
		b := make([]byte, size)
		copy(b[40:], "_FVH")
		p := filepath.Join(dir, fmt.Sprintf("fv-%d.fd", size))
		assert.NilError(t, os.WriteFile(p, b, 0o644))
		return p
	}
	assert.ErrorContains(t, check("aavmf-http", Spec{FirmwareCode: fv(2 << 20)}), "exactly 67108864")
	assert.NilError(t, check("aavmf-grub", Spec{FirmwareCode: fv(2 << 20)}), "-bios on virt: any size that fits")
	assert.ErrorContains(t, check("ovmf-pxe", Spec{FirmwareCode: fv(3<<20 + 100)}), "not a whole number of 4 KiB")
	assert.ErrorContains(t, check("ovmf-pxe", Spec{FirmwareCode: fv(7 << 20), FirmwareVars: fv(2 << 20)}), "together, more than")
	assert.NilError(t, check("ovmf-pxe", Spec{FirmwareCode: fv(3653632), FirmwareVars: fv(540672)}), "Debian's OVMF_CODE_4M.fd and OVMF_VARS_4M.fd sizes")
	rom := filepath.Join(dir, "bios.bin")
	assert.NilError(t, os.WriteFile(rom, make([]byte, 1000), 0o644))
	assert.ErrorContains(t, check("seabios-ipxe", Spec{BIOS: rom}), "64 KiB blocks")
}

func TestUserRootChecks(t *testing.T) {
	dir, img := t.TempDir(), filepath.Join(t.TempDir(), "root.img")
	assert.NilError(t, os.WriteFile(img, make([]byte, 4096), 0o644))
	for _, c := range []struct {
		spec Spec
		want string
	}{
		{Spec{Root: RootNFS, RootImage: img}, "NFS serves a tree"},
		{Spec{Root: RootNone, RootDir: dir}, "is for --root nfs or --root iscsi"},
		{Spec{Root: RootSANBoot, RootDir: dir}, "is for --root nfs or --root iscsi"},
		{Spec{Root: RootISCSI, RootDir: dir, RootImage: img}, "not both"},
		{Spec{Root: RootISCSI, RootDir: dir, RootWritable: true}, "the tree never sees"},
		{Spec{Root: RootNFS, RootDir: img}, "not a folder"},
		{Spec{Root: RootISCSI, RootImage: dir}, "not a file"},
		{Spec{Root: RootNFS, RootWritable: true}, "no root of the user's"},
	} {
		assert.ErrorContains(t, checkUserRoot(c.spec), c.want)
	}
	assert.NilError(t, checkUserRoot(Spec{Root: RootNFS, RootDir: dir, RootWritable: true}))
	assert.NilError(t, checkUserRoot(Spec{Root: RootISCSI, RootImage: img}))
}

// TestStackApplies: a stack's slots land in a row's spec where the row's
// chain and root use them, and rows it cannot run are left out.
func TestStackApplies(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "stack.json")
	assert.NilError(t, os.WriteFile(file, []byte(`{"amd64": {"kernel": "k/vmlinuz", "initrd": "/abs/initrd", "root_dir": "root",
		"loader_config": {"ipxe": "my.ipxe", "grub": "grub.cfg"}, "loader": {"*": "ipxe.efi"}, "firmware_code": {"ovmf-http": "code.fd"},
		"expect": ["my-ipxe:", "login:"], "fail_on": ["Oops=my oops"]}}`), 0o644))
	stacks, err := ReadStacks(file)
	assert.NilError(t, err)
	st := stacks["amd64"]
	assert.Equal(t, st.Kernel, filepath.Join(dir, "k/vmlinuz"))
	assert.Equal(t, st.Initrd, "/abs/initrd")
	apply := func(fw, root string, faults ...string) (Spec, bool) {
		c, _ := LookupChain("amd64", fw)
		s := Spec{Arch: "amd64", Firmware: fw, Root: root}
		for _, f := range faults {
			s.Faults = append(s.Faults, Fault{Name: f})
		}
		var serve string
		ok := st.Apply(c, &s, &serve)
		return s, ok
	}
	s, ok := apply("ovmf-pxe", RootNFS)
	assert.Assert(t, ok)
	assert.Equal(t, s.LoaderConfig, filepath.Join(dir, "my.ipxe"))
	assert.Equal(t, s.Loader, filepath.Join(dir, "ipxe.efi"))
	assert.Equal(t, s.RootDir, filepath.Join(dir, "root"))
	assert.Equal(t, s.FirmwareCode, "", "code for ovmf-http only")
	assert.DeepEqual(t, s.Steps, []string{"my-ipxe:"})
	assert.Equal(t, s.Expect, "login:")
	assert.DeepEqual(t, s.FailOn, []FailOn{{Pattern: "Oops", Reason: "my oops"}})
	s, _ = apply("ovmf-http", RootNone)
	assert.Equal(t, s.LoaderConfig, "", "no loader on HTTP boot")
	assert.Equal(t, s.Loader, "")
	assert.Equal(t, s.RootDir, "", "no root")
	assert.Equal(t, s.FirmwareCode, filepath.Join(dir, "code.fd"))
	_, ok = apply("seabios-ipxe", RootNone, "corrupt-archive")
	assert.Assert(t, !ok, "a fault of the reference archive with the user's archive")
	_, ok = apply("seabios-ipxe", RootNFS, "stale-config")
	assert.Assert(t, !ok)
	// With the root's files in the reference archive, the keeper's faults
	// apply to the NFS rows.
	st.Initrd, st.ArchiveFiles = "", []string{"config /etc/hostname"}
	s, ok = apply("seabios-ipxe", RootNFS, "stale-config")
	assert.Assert(t, ok)
	assert.DeepEqual(t, s.ArchiveFromRoot, []string{"config /etc/hostname"})
	_, ok = apply("seabios-ipxe", RootISCSI, "stale-config")
	assert.Assert(t, !ok)
	_, err = ReadStacks(writeFile2(t, `{"amd64": {"kernal": "x"}}`))
	assert.ErrorContains(t, err, "kernal")
	_, err = ReadStacks(writeFile2(t, `{"amd64": {"loader_config": {"pxe": "x"}}}`))
	assert.ErrorContains(t, err, "want ipxe, pxelinux or grub")
	_, err = ReadStacks(writeFile2(t, `{"amd64": {"loader": {"ovmf_pxe": "x"}}}`))
	assert.ErrorContains(t, err, `"ovmf_pxe"`)
	_, err = ReadStacks(writeFile2(t, `{"amd64": {"expect": ["("]}}`))
	assert.ErrorContains(t, err, "expect")
}

func writeFile2(t *testing.T, s string) string {
	p := filepath.Join(t.TempDir(), "f.json")
	assert.NilError(t, os.WriteFile(p, []byte(s), 0o644))
	return p
}

// TestArchiveDrift: the server's comparison names exactly the root files
// that changed since the archive was made — for an archive nbh made (its
// manifest says which members are the root's) and for one GNU cpio made
// (configuration and modules, not binaries an archive builder puts under
// the root's names).
func TestArchiveDrift(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("cpio is not installed (scripts/setup installs it)")
	}
	base := t.TempDir()
	root := filepath.Join(base, "root")
	files := map[string]string{
		"etc/modprobe.d/site.conf": "options a b=1\n", "etc/hostname": "vm\n", "etc/ld.so.cache": "cache",
		"usr/lib/modules/6.1/kernel/x.ko": "module", "usr/bin/cat": "coreutils cat",
	}
	for name, data := range files {
		p := filepath.Join(root, name)
		assert.NilError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		assert.NilError(t, os.WriteFile(p, []byte(data), 0o644))
	}
	// Another builder's archive: the root's files, but its own cat and
	// linker cache.
	stage := filepath.Join(base, "stage")
	assert.NilError(t, exec.Command("cp", "-a", root, stage).Run())
	assert.NilError(t, os.WriteFile(filepath.Join(stage, "usr/bin/cat"), []byte("klibc cat"), 0o755))
	assert.NilError(t, os.WriteFile(filepath.Join(stage, "etc/ld.so.cache"), []byte("its own"), 0o644))
	cmd := exec.Command("sh", "-c", "find . -mindepth 1 | cpio -o -H newc --quiet | gzip > ../foreign.img")
	cmd.Dir = stage
	assert.NilError(t, cmd.Run())
	// nbh's: two files of the root, recorded in its manifest.
	res, err := archive.Build(archive.Spec{Root: root, Tracked: []archive.Tracked{{Path: "/etc/modprobe.d/site.conf"}, {Path: "/etc/hostname", Editable: true}},
		Files: map[string]string{"usr/bin/cat": filepath.Join(stage, "usr/bin/cat")}}, filepath.Join(base, "cache"))
	assert.NilError(t, err)
	r, err := os.OpenRoot(root)
	assert.NilError(t, err)
	defer r.Close()

	for _, c := range []struct {
		file    string
		compare int
	}{{filepath.Join(base, "foreign.img"), 3}, {res.Path, 2}} {
		differ, compared, err := archiveDrift(context.Background(), c.file, r)
		assert.NilError(t, err)
		assert.Equal(t, len(differ), 0, "%s: %v", c.file, differ)
		assert.Equal(t, compared, c.compare, c.file)
	}
	assert.NilError(t, os.WriteFile(filepath.Join(root, "etc/modprobe.d/site.conf"), []byte("options a b=2\n"), 0o644))
	for _, file := range []string{filepath.Join(base, "foreign.img"), res.Path} {
		differ, _, err := archiveDrift(context.Background(), file, r)
		assert.NilError(t, err)
		assert.DeepEqual(t, differ, []string{"etc/modprobe.d/site.conf"})
	}
	// Of a name the archive holds twice, the kernel keeps the last: an
	// older copy before the root's current one is no drift.
	dup := filepath.Join(base, "dup.img")
	cmd = exec.Command("sh", "-c", "cd "+stage+" && printf 'etc/modprobe.d/site.conf\n' | cpio -o -H newc --quiet > "+dup+
		" && cp "+filepath.Join(root, "etc/modprobe.d/site.conf")+" etc/modprobe.d/site.conf && printf 'etc/modprobe.d/site.conf\n' | cpio -o -H newc --quiet >> "+dup)
	assert.NilError(t, cmd.Run())
	differ, compared, err := archiveDrift(context.Background(), dup, r)
	assert.NilError(t, err)
	assert.Equal(t, compared, 1)
	assert.Equal(t, len(differ), 0, "%v", differ)
	// A comparison the guest's end cut short is an error, not "fresh".
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, _, err = archiveDrift(ctx, res.Path, r)
	assert.ErrorIs(t, err, context.Canceled)
}

// TestRootFilesStayInTheTree: a file added to a user's tree lands in the
// tree even where the tree has a symlink out of it (as a systemd root's
// etc/resolv.conf is), and the host file the link names is untouched.
func TestRootFilesStayInTheTree(t *testing.T) {
	base := t.TempDir()
	tree, host := filepath.Join(base, "tree"), filepath.Join(base, "host-file")
	assert.NilError(t, os.MkdirAll(filepath.Join(tree, "etc"), 0o755))
	assert.NilError(t, os.WriteFile(host, []byte("host"), 0o644))
	assert.NilError(t, os.Symlink(host, filepath.Join(tree, "etc/resolv.conf")))
	assert.NilError(t, os.Symlink(filepath.Join(base), filepath.Join(tree, "out")))
	src := filepath.Join(base, "src")
	assert.NilError(t, os.WriteFile(src, []byte("mine"), 0o644))
	g := &Guest{spec: Spec{RootFiles: map[string]string{"/etc/resolv.conf": src}}}
	assert.NilError(t, g.addRootFiles(tree))
	b, err := os.ReadFile(host)
	assert.NilError(t, err)
	assert.Equal(t, string(b), "host", "written through the tree's link")
	b, err = os.ReadFile(filepath.Join(tree, "etc/resolv.conf"))
	assert.NilError(t, err)
	assert.Equal(t, string(b), "mine")
	g.spec.RootFiles = map[string]string{"/out/host-file": src}
	assert.Assert(t, g.addRootFiles(tree) != nil, "written through a linked folder out of the tree")
	b, _ = os.ReadFile(host)
	assert.Equal(t, string(b), "host")
}
