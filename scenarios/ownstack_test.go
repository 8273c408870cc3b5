package scenarios

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/images"
	"nbh.dev/nbh/images/stock"
	"nbh.dev/nbh/internal/fsutil"
)

// The user's own boot stack: their root tree, kernel and archive, loader
// configuration, loader binary, NIC, and expectations, each booted for real.

// debianRoot is a Debian 12 root with systemd, made by mmdebstrap as a
// user would make it (not by nbh's image code), with its own kernel. On the
// host's architecture (amd64) it is a minbase root with initramfs-tools
// (MODULES=netboot) and its own archive; for arm64 on an amd64 host, where
// no package's maintainer scripts can run without qemu-user in binfmt_misc
// (a host-wide change nbh does not make), the packages are only extracted
// and the few files their scripts would write are written by hand, and the
// root has no archive of its own (Initrd ""): nbh archive build makes one.
// Either has a site file in /etc/modprobe.d that archives carry a copy of.
// Made once per image cache (a minute or two) and kept there; never changed.
type debianRoot struct {
	Dir, Kernel, Initrd string
}

var (
	rootMu   sync.Mutex
	rootMade = map[string]debianRoot{}
)

// siteConf is the root's file that its archives also hold.
const siteConf = "/etc/modprobe.d/nbh-site.conf"

func ownDebianRoot(t *testing.T, arch string) debianRoot {
	t.Helper()
	if _, err := exec.LookPath("mmdebstrap"); err != nil {
		t.Skip("mmdebstrap is not installed (make setup installs it)")
	}
	rootMu.Lock()
	defer rootMu.Unlock()
	if r, ok := rootMade[arch]; ok {
		return r
	}
	r, err := makeDebianRoot(arch)
	assert.NilError(t, err)
	rootMade[arch] = r
	return r
}

func makeDebianRoot(arch string) (debianRoot, error) {
	base := filepath.Join(nbhtest.Cache().Dir, "scenario-roots")
	dir := filepath.Join(base, "bookworm-systemd-"+arch)
	tree := filepath.Join(dir, "root")
	unlock, err := fsutil.LockDir(base)
	if err != nil {
		return debianRoot{}, err
	}
	defer unlock()
	if _, err := os.Stat(filepath.Join(dir, ".complete")); err != nil {
		suite, sources, err := stock.HostSources()
		if err != nil {
			return debianRoot{}, err
		}
		os.RemoveAll(dir)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return debianRoot{}, err
		}
		site := `--customize-hook=mkdir -p "$1/etc/modprobe.d" && echo "# site options (nbh scenario)" > "$1` + siteConf + `"`
		args := []string{"--architectures=" + arch}
		if arch == "amd64" {
			args = append(args, "--variant=minbase", "--include=systemd-sysv,udev,linux-image-amd64,initramfs-tools",
				`--customize-hook=sed -i "s/^MODULES=.*/MODULES=netboot/" "$1/etc/initramfs-tools/initramfs.conf"`,
				site, `--customize-hook=chroot "$1" update-initramfs -u -k all`)
		} else {
			// (mmdebstrap runs no hooks for the extract variant: the
			// files are written below.)
			args = append(args, "--variant=extract",
				"--include=base-files,base-passwd,bash,coreutils,systemd,systemd-sysv,udev,util-linux,login,mount,libpam-runtime,libpam-modules,linux-image-"+arch)
		}
		cmd := exec.Command("mmdebstrap", append(append(args, suite, tree), sources...)...)
		cmd.Env = append(os.Environ(), "LC_ALL=C.UTF-8", "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			os.RemoveAll(dir)
			tail := string(out)
			if len(tail) > 4000 {
				tail = tail[len(tail)-4000:]
			}
			return debianRoot{}, fmt.Errorf("mmdebstrap: %v\n%s", err, tail)
		}
		if arch != "amd64" {
			// What base-passwd's and systemd's scripts would write.
			for dst, src := range map[string]string{"etc/passwd": "usr/share/base-passwd/passwd.master", "etc/group": "usr/share/base-passwd/group.master"} {
				if err := fsutil.CopyFile(filepath.Join(tree, src), filepath.Join(tree, dst)); err != nil {
					return debianRoot{}, err
				}
			}
			for name, data := range map[string]string{"etc/machine-id": "", "etc/hostname": "vm\n", strings.TrimPrefix(siteConf, "/"): "# site options (nbh scenario)\n"} {
				if err := os.MkdirAll(filepath.Dir(filepath.Join(tree, name)), 0o755); err != nil {
					return debianRoot{}, err
				}
				if err := os.WriteFile(filepath.Join(tree, name), []byte(data), 0o644); err != nil {
					return debianRoot{}, err
				}
			}
		}
		if err := os.WriteFile(filepath.Join(dir, ".complete"), nil, 0o644); err != nil {
			return debianRoot{}, err
		}
	}
	kernels, _ := filepath.Glob(filepath.Join(tree, "boot/vmlinuz-*"))
	if len(kernels) != 1 {
		return debianRoot{}, fmt.Errorf("%s: want one kernel in /boot, have %v", tree, kernels)
	}
	r := debianRoot{Dir: tree, Kernel: kernels[0]}
	if arch == "amd64" {
		r.Initrd = filepath.Join(tree, "boot/initrd.img-"+strings.TrimPrefix(filepath.Base(kernels[0]), "vmlinuz-"))
	}
	return r, nil
}

// events are the guest's timeline events of a kind.
func events(g *harness.Guest, source, kind string) []timeline.Event {
	var out []timeline.Event
	for _, e := range g.Events() {
		if e.Source == source && e.Kind == kind {
			out = append(out, e)
		}
	}
	return out
}

// TestOwnDebianRoot boots a stock systemd root — the user's tree, kernel
// and archive — to its serial login prompt: over NFS with its own
// initramfs-tools archive, and over iSCSI (an ext4 image of the tree) with
// an archive nbh archive build made for it; an arm64 root over NFS through
// U-Boot with the archive nbh archive build made for it. Then the tree's site file
// changes after the archives were made: the server's comparison at the
// NFS mount names it, a warning for the root's own archive (its init does
// not check), a failure with evidence for nbh's (its init stops).
func TestOwnDebianRoot(t *testing.T) {
	needGuests(t)
	t.Parallel()
	if !selected("amd64", "seabios-ipxe") {
		t.Skip("amd64/seabios-ipxe not selected")
	}
	root := ownDebianRoot(t, "amd64")
	bin := buildNBH(t)
	list := filepath.Join(t.TempDir(), "files.list")
	assert.NilError(t, os.WriteFile(list, []byte("# the site's files\n/etc/modprobe.d/*.conf\nconfig /etc/hostname\n"), 0o644))
	archiveFor := func(arch string, r debianRoot) string {
		out := filepath.Join(t.TempDir(), "initrd.img")
		b, err := exec.Command(bin, "archive", "build", "--arch", arch, "--root", r.Dir, "--files", list, "--out", out).CombinedOutput()
		assert.NilError(t, err, "%s", b)
		assert.Check(t, is.Contains(string(b), "2 files of the root"))
		return out
	}
	nbhArchive := archiveFor("amd64", root)
	// An image of the tree made the user's way, for --root-image.
	image := filepath.Join(t.TempDir(), "root.ext4")
	out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", root.Dir, image, "1536M").CombinedOutput()
	assert.NilError(t, err, "%s", out)
	var root64 debianRoot
	var nbhArchive64 string
	if selected("arm64", "uboot") {
		root64 = ownDebianRoot(t, "arm64")
		nbhArchive64 = archiveFor("arm64", root64)
	}
	changed := filepath.Join(t.TempDir(), "nbh-site.conf")
	assert.NilError(t, os.WriteFile(changed, []byte("# site options, changed after the archives were made\noptions loop max_loop=4\n"), 0o644))

	for _, c := range []struct {
		name, arch, firmware, root, initrd string
		rootFiles                          map[string]string
		steps                              []string
		image                              string // the root as an image of the user's (--root-image)
		fromRoot                           bool   // the reference archive with the root's files
		fault                              string // one of the lab's faults
		stale                              bool
		want                               failure.Reason
	}{
		{name: "arm64-nfs-nbh-archive", arch: "arm64", firmware: "uboot", root: harness.RootNFS, initrd: nbhArchive64,
			steps: []string{`nbh-init: mounting root nfs`, `Welcome to .*Debian GNU/Linux 12`}},
		{name: "nfs-own-initramfs", firmware: "seabios-ipxe", root: harness.RootNFS, initrd: root.Initrd,
			steps: []string{`Begin: Mounting root file system`, `Welcome to .*Debian GNU/Linux 12`}},
		{name: "iscsi-nbh-archive", firmware: "seabios-ipxe", root: harness.RootISCSI, initrd: nbhArchive,
			steps: []string{`nbh-init: mounting root iscsi`, `Welcome to .*Debian GNU/Linux 12`}},
		{name: "iscsi-root-image", firmware: "direct", root: harness.RootISCSI, initrd: nbhArchive, image: image,
			steps: []string{`nbh-init: mounting root iscsi`, `Welcome to .*Debian GNU/Linux 12`}},
		{name: "nfs-stale-own-initramfs", firmware: "direct", root: harness.RootNFS, initrd: root.Initrd,
			rootFiles: map[string]string{siteConf: changed}, stale: true},
		{name: "nfs-stale-nbh-archive", firmware: "direct", root: harness.RootNFS, initrd: nbhArchive,
			rootFiles: map[string]string{siteConf: changed}, stale: true, want: failure.StaleArchive},
		// The reference archive with the root's files and its kernel's
		// modules (ArchiveFromRoot): the boot server keeps it current when
		// the root's file changes after the build, as for nbh's own root...
		{name: "nfs-keeper-rebuilds", firmware: "direct", root: harness.RootNFS, fromRoot: true, fault: "config-changed",
			steps: []string{`NBH-ARCHIVE fresh`}},
		// ...unless it is told not to.
		{name: "nfs-keeper-stale", firmware: "direct", root: harness.RootNFS, fromRoot: true, fault: "stale-config",
			stale: true, want: failure.StaleArchive},
	} {
		t.Run(c.name, func(t *testing.T) {
			guestTest(t)
			r := root
			if c.arch == "" {
				c.arch = "amd64"
			} else if r = root64; r.Dir == "" {
				t.Skipf("%s/%s not selected", c.arch, c.firmware)
			}
			lab := nbhtest.NewLab(t)
			spec := harness.Spec{Arch: c.arch, Firmware: c.firmware, Root: c.root,
				RootDir: r.Dir, RootFiles: c.rootFiles, Kernel: r.Kernel, Initrd: c.initrd,
				Steps: c.steps, Expect: `login:`, Timeout: 420 * time.Second, Artifacts: nbhtest.Artifacts(t, "g1"),
				// systemd's own start, from the root's mount (or the last
				// step) to the login prompt, takes well over a minute for
				// an arm64 guest under TCG while other guests boot.
				StageTimeouts: map[timeline.Stage]time.Duration{timeline.Root: 240 * time.Second}}
			if c.fromRoot {
				spec.ArchiveFromRoot = []string{"/etc/modprobe.d/*.conf", "config " + siteConf}
			}
			if c.image != "" {
				spec.RootDir, spec.RootImage = "", c.image
			}
			if c.fault != "" {
				spec.Faults = []harness.Fault{fault(t, c.fault)}
			}
			var before os.FileInfo
			if c.image != "" {
				before, err = os.Stat(c.image)
				assert.NilError(t, err)
			}
			g, err := lab.Boot(context.Background(), spec)
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			if before != nil {
				// The guest (systemd writes) wrote to its copy, not the
				// user's image.
				assert.NilError(t, g.Close())
				after, err := os.Stat(c.image)
				assert.NilError(t, err)
				assert.Check(t, after.ModTime().Equal(before.ModTime()) && after.Size() == before.Size(), "the user's image changed")
			}
			t.Logf("%s: %s after %.1fs\n%s", c.name, map[bool]string{true: "login prompt", false: string(v.Reason)}[v.OK], v.Elapsed.Seconds(), timeline.Table(g.Spans(), g.Start))
			if c.want == failure.None {
				assert.Assert(t, v.OK, "%v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
				assert.Equal(t, len(events(g, "console", "expect")), len(c.steps), "every step on the timeline")
			} else {
				assert.Equal(t, v.Reason, c.want, "%v", v.Err())
			}
			stale := events(g, "archive", "stale-archive")
			if c.fromRoot {
				// The lab edited the root's site file after the build.
				assert.Equal(t, len(events(g, "lab", "root-edit")), 1)
				assert.Check(t, is.Contains(events(g, "lab", "root-edit")[0].Msg, siteConf))
			}
			if c.fault == "config-changed" {
				assert.Equal(t, len(events(g, "archive", "rebuild")), 1, "the keeper did not rebuild the archive")
			}
			if !c.stale {
				if c.root == harness.RootNFS {
					assert.Equal(t, len(events(g, "archive", "archive-fresh")), 1, "no comparison at the mount")
				}
				assert.Equal(t, len(stale), 0, "%v", stale)
				return
			}
			assert.Equal(t, len(stale), 1, "no stale-archive event")
			assert.DeepEqual(t, stale[0].Detail["files"], []string{strings.TrimPrefix(siteConf, "/")})
			if v.OK {
				assert.Assert(t, len(v.Warnings) == 1 && strings.Contains(v.Warnings[0], "nbh-site.conf"), "%v", v.Warnings)
			} else {
				assert.Check(t, is.Contains(v.Detail, "the server found the archive stale"))
			}
		})
	}
}

// TestOwnNIC: a guest whose NIC is not virtio reaches the marker; the
// reference archive's init loads the card's driver by its PCI alias.
func TestOwnNIC(t *testing.T) {
	needGuests(t)
	t.Parallel()
	for _, c := range []struct{ arch, firmware, nic, driver string }{
		{"amd64", "seabios-ipxe", "e1000", "e1000"},
		{"arm64", "uboot", "e1000", "e1000"},
		{"amd64", "direct", "rtl8139", "8139cp"},
		{"riscv64", "uboot", "e1000", "e1000"},
	} {
		t.Run(c.arch+"/"+c.firmware+"/"+c.nic, func(t *testing.T) {
			guestTest(t)
			if !selected(c.arch, c.firmware) {
				t.Skipf("%s/%s not selected", c.arch, c.firmware)
			}
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(context.Background(), harness.Spec{Arch: c.arch, Firmware: c.firmware, NIC: c.nic, Artifacts: nbhtest.Artifacts(t, "g1")})
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			assert.Assert(t, v.OK, "%v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
			assert.Check(t, is.Regexp(`nbh-init: NIC \S+ \(pci [0-9a-f:]+\) -> driver `+c.driver, g.Console()))
			assert.Check(t, is.Contains(strings.Join(g.Argv(), " "), "-device "+map[string]string{"e1000": "e1000", "rtl8139": "rtl8139"}[c.nic]+",netdev=n0"))
		})
	}
}

// TestNICWithoutDriverRefused: a card the guest's kernel has no driver for
// (Debian 13's riscv64 kernel builds no 8139too) is refused before QEMU
// starts, not a boot that ends without a network.
func TestNICWithoutDriverRefused(t *testing.T) {
	if !selected("riscv64", "direct") {
		t.Skip("riscv64/direct not selected")
	}
	lab := nbhtest.NewLab(t)
	_, err := lab.Boot(context.Background(), harness.Spec{Arch: "riscv64", Firmware: "direct", NIC: "rtl8139"})
	assert.ErrorContains(t, err, "no 8139too module")
	// The same card on amd64, whose kernel has the driver, is not refused
	// (TestOwnNIC boots it).
}

// TestOwnLoaderConfig: the user's iPXE script and grub.cfg, as templates,
// boot; their own echo line is the first step on the timeline.
func TestOwnLoaderConfig(t *testing.T) {
	needGuests(t)
	t.Parallel()
	dir := t.TempDir()
	ipxe := filepath.Join(dir, "my.ipxe")
	assert.NilError(t, os.WriteFile(ipxe, []byte(`#!ipxe
echo my-ipxe: {{.Guest}} at {{.IP}} on {{.Firmware}}
kernel {{.KernelURL}} initrd=initrd.img {{.Cmdline}}
initrd --name initrd.img {{.InitrdURL}}
boot
`), 0o644))
	grub := filepath.Join(dir, "grub.cfg")
	assert.NilError(t, os.WriteFile(grub, []byte(`set timeout=0
echo "my-grub: {{.Guest}} on {{.Arch}}"
linux (http,{{.Server}})/{{.Kernel}} {{.Cmdline}}
initrd (http,{{.Server}})/{{.Initrd}}
boot
`), 0o644))
	for _, c := range []struct{ arch, firmware, config, echo string }{
		{"amd64", "seabios-ipxe", ipxe, `my-ipxe: g1 at 10\.0\.2\.\d+ on seabios-ipxe`},
		{"arm64", "aavmf-grub", grub, `my-grub: g1 on arm64`},
	} {
		t.Run(c.arch+"/"+c.firmware, func(t *testing.T) {
			guestTest(t)
			if !selected(c.arch, c.firmware) {
				t.Skipf("%s/%s not selected", c.arch, c.firmware)
			}
			lab := nbhtest.NewLab(t)
			g, err := lab.Boot(context.Background(), harness.Spec{Arch: c.arch, Firmware: c.firmware, LoaderConfig: c.config,
				Steps: []string{c.echo}, Artifacts: nbhtest.Artifacts(t, "g1")})
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			assert.Assert(t, v.OK, "%v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
			steps := events(g, "console", "expect")
			assert.Assert(t, len(steps) == 1, "%v", steps)
			assert.Equal(t, steps[0].Stage, timeline.None)
		})
	}
	// A template with a syntax error: exit 2, naming its file and line,
	// before any lab is set up.
	t.Run("syntax-error", func(t *testing.T) {
		bin := buildNBH(t)
		bad := filepath.Join(t.TempDir(), "bad.ipxe")
		assert.NilError(t, os.WriteFile(bad, []byte("#!ipxe\necho fine\nkernel {{.KernelURL}\n"), 0o644))
		cmd := exec.Command(bin, "boot", "--arch", "amd64", "--firmware", "seabios-ipxe", "--loader-config", bad)
		out, err := cmd.CombinedOutput()
		assert.Assert(t, err != nil)
		assert.Equal(t, cmd.ProcessState.ExitCode(), 2, "%s", out)
		assert.Check(t, is.Contains(string(out), bad+":3:"))
		assert.Check(t, !strings.Contains(string(out), "booting"), "%s", out)
	})
}

// TestOwnLoaderAndFirmware: Debian 13's ipxe.efi (iPXE 1.21), brought as
// the user's loader, boots ovmf-pxe in place of Debian 12's; a firmware
// code file that is no firmware is refused before any QEMU starts.
func TestOwnLoaderAndFirmware(t *testing.T) {
	needGuests(t)
	t.Parallel()
	t.Run("ovmf-pxe-ipxe-1.21", func(t *testing.T) {
		guestTest(t)
		if !selected("amd64", "ovmf-pxe") {
			t.Skip("amd64/ovmf-pxe not selected")
		}
		lab := nbhtest.NewLab(t)
		loader, err := lab.Cache().Path(context.Background(), "arm64", images.File{Package: "ipxe", Path: "usr/lib/ipxe/ipxe-amd64.efi", Suite: "trixie"})
		assert.NilError(t, err)
		g, err := lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: "ovmf-pxe", Loader: loader, Artifacts: nbhtest.Artifacts(t, "g1")})
		assert.NilError(t, err)
		v := g.Wait(context.Background())
		assert.Assert(t, v.OK, "%v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
		assert.Check(t, is.Contains(g.Console(), "iPXE 1.21"))
		var fetched bool
		for _, e := range events(g, "tftp", "transfer") {
			fetched = fetched || strings.HasPrefix(e.Msg, "g1/ipxe-amd64.efi")
		}
		assert.Check(t, fetched, "the firmware did not fetch the user's loader")
	})
	t.Run("not-firmware", func(t *testing.T) {
		needGuests(t)
		lab := nbhtest.NewLab(t)
		notFW := filepath.Join(t.TempDir(), "OVMF_CODE.fd")
		assert.NilError(t, os.WriteFile(notFW, []byte(strings.Repeat("not firmware\n", 100)), 0o644))
		_, err := lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: "ovmf-pxe", FirmwareCode: notFW})
		assert.ErrorContains(t, err, notFW+": not a UEFI firmware image")
		for _, e := range lab.Timeline().Events("") {
			assert.Check(t, e.Source != "qemu", "QEMU started: %v", e)
		}
		bin := buildNBH(t)
		cmd := exec.Command(bin, "boot", "--arch", "amd64", "--firmware", "ovmf-http", "--firmware-code", notFW)
		out, _ := cmd.CombinedOutput()
		assert.Equal(t, cmd.ProcessState.ExitCode(), 2, "%s", out)
		assert.Check(t, is.Contains(string(out), "not a UEFI firmware image"))
	})
}

// TestOwnExpectations: the user's failure signature classifies a boot as
// theirs; expectations are ordered: a step seen before the one it follows
// does not count, and the verdict names the first expectation missed.
func TestOwnExpectations(t *testing.T) {
	needGuests(t)
	t.Parallel()
	t.Run("fail-on", func(t *testing.T) {
		guestTest(t)
		lab := nbhtest.NewLab(t)
		g, err := lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: "direct",
			FailOn: []harness.FailOn{{Pattern: `nbh-init: loaded \d+ modules`, Reason: "my site's failure"}}})
		assert.NilError(t, err)
		v := g.Wait(context.Background())
		assert.Equal(t, v.Reason, failure.Reason("my site's failure"), "%v", v.Err())
		assert.Equal(t, v.Stage, timeline.Init)
	})
	t.Run("out-of-order", func(t *testing.T) {
		guestTest(t)
		lab := nbhtest.NewLab(t)
		g, err := lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: "direct",
			Steps: []string{`NBH-READY`}, Expect: `nbh-init: started`})
		assert.NilError(t, err)
		v := g.Wait(context.Background())
		assert.Assert(t, !v.OK)
		assert.Equal(t, v.Reason, failure.GuestStopped, "%v", v.Err())
		assert.Check(t, is.Contains(v.Detail, `expectation 2 of 2 not reached: "nbh-init: started"`))
		assert.Equal(t, len(events(g, "console", "expect")), 1)
	})
}

// TestDebianRootConversation: the conversation API with a stock systemd
// root (the user's Debian tree, its kernel and initramfs-tools archive,
// over NFS): Login at its serial getty, then Run against its bash, with
// kernel and systemd messages free to interleave on the console.
func TestDebianRootConversation(t *testing.T) {
	guestTest(t)
	if !selected("amd64", "direct") {
		t.Skip("amd64/direct not selected")
	}
	root := ownDebianRoot(t, "amd64")
	// The guest's copy of the tree lets root log in without a password
	// (mmdebstrap locks the account); the user's tree is left as it is.
	shadow, err := os.ReadFile(filepath.Join(root.Dir, "etc/shadow"))
	assert.NilError(t, err)
	lines := strings.Split(string(shadow), "\n")
	for i, l := range lines {
		if f := strings.SplitN(l, ":", 3); len(f) == 3 && f[0] == "root" {
			lines[i] = "root::" + f[2]
		}
	}
	open := filepath.Join(t.TempDir(), "shadow")
	assert.NilError(t, os.WriteFile(open, []byte(strings.Join(lines, "\n")), 0o600))

	ctx := context.Background()
	lab := nbhtest.NewLab(t)
	g, err := lab.Boot(ctx, harness.Spec{Arch: "amd64", Firmware: "direct", Root: harness.RootNFS,
		RootDir: root.Dir, RootFiles: map[string]string{"/etc/shadow": open}, Kernel: root.Kernel, Initrd: root.Initrd,
		Expect: `login:`, Timeout: 420 * time.Second, Artifacts: nbhtest.Artifacts(t, "g1"),
		StageTimeouts: map[timeline.Stage]time.Duration{timeline.Root: 240 * time.Second}})
	assert.NilError(t, err)
	v := g.Wait(ctx)
	assert.Assert(t, v.OK, "%v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
	assert.NilError(t, g.Login(ctx, "root", ""))
	out, status, err := g.Run(ctx, "grep ^VERSION_CODENAME= /etc/os-release; readlink /proc/1/exe")
	assert.NilError(t, err)
	assert.Equal(t, status, 0)
	assert.Equal(t, out, "VERSION_CODENAME=bookworm\n/usr/lib/systemd/systemd\n")
	_, status, err = g.Run(ctx, "false")
	assert.NilError(t, err)
	assert.Equal(t, status, 1)
	assert.NilError(t, g.PowerOff(ctx))
}
