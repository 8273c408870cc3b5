// Package stock builds boot archives with the distribution's own generators —
// Debian's initramfs-tools and dracut — for the cached Debian kernel, so the
// lab's DHCP, NFS and iSCSI services are exercised by the initramfs code real
// machines run (klibc ipconfig and nfsmount, dracut's dhclient, mount.nfs and
// iscsistart), not only by the reference init.
//
// Each archive is made in a throwaway Debian chroot created by mmdebstrap
// from the host's own apt sources, with the kernel's modules copied in; the
// chroot is discarded and only the archive is kept in the cache, with the
// package versions that made it and the build log. Nothing on the host is
// configured: the generators run inside the chroot, never on the host.
//
// A chroot runs the target architecture's programs, so an archive can only be
// made for the host's own architecture: making arm64 archives on an amd64
// host would need qemu-user emulation registered with the host kernel's
// binfmt_misc, a host-wide change nbh does not make.
package stock

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"time"

	"nbh.dev/nbh/images"
	"nbh.dev/nbh/internal/fsutil"
)

// The generators.
const (
	InitramfsTools = "initramfs-tools"
	Dracut         = "dracut"
	// InitramfsISCSI is initramfs-tools with open-iscsi's hook: the stock
	// client of a SAN boot (RootSANBoot), which reads the iBFT.
	InitramfsISCSI = "initramfs-tools-iscsi"
)

// recipe is how one generator's archive is made.
type recipe struct {
	help string
	// packages go into the chroot besides the essential set. What each
	// generator needs beyond its own dependencies was found the hard way:
	// dracut's network module wants pgrep (procps) and arping, its nfs
	// module umount (mount); mount.nfs fails with "Protocol not supported"
	// unless /etc/protocols (netbase) is in the archive.
	packages []string
	// configure edits the chroot ($1) before the archive is made.
	configure string
	// make writes /tmp/initrd.img in the chroot for kernel version $KVER.
	make string
	// versions are the packages whose versions are recorded with the archive.
	versions []string
}

var recipes = map[string]recipe{
	InitramfsTools: {
		help:     "Debian's initramfs-tools with BOOT=nfs and MODULES=netboot (klibc ipconfig and nfsmount)",
		packages: []string{"initramfs-tools", "klibc-utils", "busybox", "kmod", "zstd"},
		// initramfs.conf(5): BOOT=nfs makes the archive boot from NFS whatever
		// root= says (the file has no BOOT line to edit).
		configure: `sed -i -e 's/^MODULES=.*/MODULES=netboot/' "$1/etc/initramfs-tools/initramfs.conf"` +
			` && echo BOOT=nfs >> "$1/etc/initramfs-tools/initramfs.conf"`,
		make:     `mkinitramfs -o /tmp/initrd.img "$KVER"`,
		versions: []string{"initramfs-tools", "klibc-utils", "busybox"},
	},
	InitramfsISCSI: {
		help: "Debian's initramfs-tools with open-iscsi's hook (iscsistart): iscsi_auto brings the network up and logs in from the iBFT, then the root is a local disk",
		// udev: the hook requires it (udevadm settle, /dev/disk/by-*).
		// MODULES=netboot (the NIC drivers; the hook adds iSCSI and the
		// iBFT reader) with the root's disk and file system: MODULES=most
		// makes a 30 MB archive, and a Unified Kernel Image over 32 MiB
		// is more than Debian 12's iPXE reads right from a SAN disk (it
		// cuts a longer read to READ(10)'s 16-bit block count).
		packages: []string{"initramfs-tools", "klibc-utils", "busybox", "kmod", "zstd", "open-iscsi", "udev"},
		configure: `sed -i -e 's/^MODULES=.*/MODULES=netboot/' "$1/etc/initramfs-tools/initramfs.conf"` +
			` && printf '%s\n' sd_mod ext4 crc32c_generic >> "$1/etc/initramfs-tools/modules"`,
		make:     `mkinitramfs -o /tmp/initrd.img "$KVER"`,
		versions: []string{"initramfs-tools", "open-iscsi", "udev", "busybox"},
	},
	Dracut: {
		help: "dracut, not host-only, with its nfs, iscsi and network modules (dhclient, mount.nfs, iscsistart)",
		packages: []string{"dracut", "dracut-network", "nfs-common", "open-iscsi", "isc-dhcp-client",
			"kmod", "zstd", "iproute2", "procps", "mount", "iputils-arping", "netbase"},
		make:     `dracut --no-hostonly --kver "$KVER" --add "nfs iscsi network" --force /tmp/initrd.img`,
		versions: []string{"dracut", "dracut-network", "nfs-common", "open-iscsi", "isc-dhcp-client"},
	},
}

// Tools are the generator names, sorted.
func Tools() []string {
	var names []string
	for n := range recipes {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Help is a one-line description of tool.
func Help(tool string) string { return recipes[tool].help }

// Errors a build can end with, for errors.Is.
var (
	ErrUnknownTool = errors.New("unknown generator")
	ErrForeignArch = errors.New("cannot build for a foreign architecture")
	ErrMissingTool = errors.New("missing host tool")
)

// Archive is a built archive in the cache.
type Archive struct {
	Tool, Arch, Kernel string
	Path               string // the archive
	Packages           string // the generator's package versions, one per line
	Log                string // the full build log
	// Seconds is how long the generator itself ran (inside the chroot,
	// without making the chroot).
	Seconds float64
}

// Options vary a build.
type Options struct {
	// Modules, when set, makes initramfs-tools include exactly these
	// modules (MODULES=list) instead of its netboot set: for comparing its
	// build with the reference archive's.
	Modules []string
	// Rebuild builds again even when the cache has the archive (for
	// timing the generator in this run).
	Rebuild bool
}

// Build returns the archive tool makes for the cached kernel of arch,
// building it on first use (about a minute; progress goes to log, nil for
// none). Parallel callers, in this process or others, build it once.
func Build(ctx context.Context, c *images.Cache, tool, arch string, log io.Writer) (*Archive, error) {
	return BuildWith(ctx, c, tool, arch, Options{}, log)
}

// BuildWith is Build with options.
func BuildWith(ctx context.Context, c *images.Cache, tool, arch string, o Options, log io.Writer) (*Archive, error) {
	r, ok := recipes[tool]
	if !ok {
		return nil, fmt.Errorf("stock: %w %q (have %s)", ErrUnknownTool, tool, strings.Join(Tools(), ", "))
	}
	if len(o.Modules) > 0 {
		if tool != InitramfsTools {
			return nil, fmt.Errorf("stock: a module list is only for %s", InitramfsTools)
		}
		r.configure = `sed -i -e 's/^MODULES=.*/MODULES=list/' "$1/etc/initramfs-tools/initramfs.conf"` +
			fmt.Sprintf(` && printf '%%s\n' %s >> "$1/etc/initramfs-tools/modules"`, strings.Join(o.Modules, " "))
	}
	if host := hostArch(); arch != host {
		return nil, fmt.Errorf("stock: %s archive for %s: %w: the generator runs inside an %s chroot, which on this %s host would need qemu-user emulation registered with the kernel's binfmt_misc (a host-wide change nbh does not make)", tool, arch, ErrForeignArch, arch, host)
	}
	if log == nil {
		log = io.Discard
	}
	k, err := c.Kernel(ctx, arch)
	if err != nil {
		return nil, err
	}
	suite, sources, err := HostSources()
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s\n%s\n%s\n%s\n%s\n", tool, arch, k.Image, suite, strings.Join(r.packages, ","), r.configure+r.make)
	key := hex.EncodeToString(h.Sum(nil))[:12]
	dir := filepath.Join(c.Dir, "stock", fmt.Sprintf("%s_%s_%s", tool, k.Version, key))
	a := &Archive{Tool: tool, Arch: arch, Kernel: k.Version,
		Path: filepath.Join(dir, "initrd.img"), Packages: filepath.Join(dir, "packages.txt"), Log: filepath.Join(dir, "build.log")}

	unlock, err := fsutil.LockDir(filepath.Join(c.Dir, "stock"))
	if err != nil {
		return nil, fmt.Errorf("stock: %w", err)
	}
	defer unlock()
	if _, err := os.Stat(filepath.Join(dir, ".complete")); err == nil && !o.Rebuild {
		a.Seconds = readSeconds(filepath.Join(dir, "seconds"))
		return a, nil
	}
	if _, err := exec.LookPath("mmdebstrap"); err != nil {
		return nil, fmt.Errorf("stock: %w: mmdebstrap (install the Debian package mmdebstrap; make setup does)", ErrMissingTool)
	}
	tmp := dir + ".tmp"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return nil, fmt.Errorf("stock: %w", err)
	}
	defer os.RemoveAll(tmp)

	hooks := []string{
		// The kernel's modules and config (mkinitramfs reads /boot/config-*).
		fmt.Sprintf(`mkdir -p "$1/lib/modules" "$1/boot" && cp -a %s "$1/lib/modules/" && cp -a %s/. "$1/boot/"`,
			quote(k.Modules), quote(filepath.Dir(k.Image))),
	}
	if r.configure != "" {
		hooks = append(hooks, r.configure)
	}
	hooks = append(hooks,
		fmt.Sprintf(`KVER=%s; export KVER; chroot "$1" depmod "$KVER" && t0=$(date +%%s.%%N) && chroot "$1" sh -c %s && t1=$(date +%%s.%%N) && echo "$t0 $t1" > %s`,
			quote(k.Version), quote(r.make), quote(filepath.Join(tmp, "seconds"))),
		fmt.Sprintf(`chroot "$1" dpkg-query -W -f '${Package} ${Version}\n' %s > %s`, strings.Join(r.versions, " "), quote(filepath.Join(tmp, "packages.txt"))),
		"copy-out /tmp/initrd.img "+tmp,
	)
	args := []string{"--variant=essential", "--architectures=" + arch, "--include=" + strings.Join(r.packages, ",")}
	for _, hk := range hooks {
		args = append(args, "--customize-hook="+hk)
	}
	// The chroot is thrown away: only the hooks' copies leave it.
	args = append(args, suite, "/dev/null")
	args = append(args, sources...)

	logFile, err := os.Create(filepath.Join(tmp, "build.log"))
	if err != nil {
		return nil, fmt.Errorf("stock: %w", err)
	}
	defer logFile.Close()
	fmt.Fprintf(log, "stock: building the %s archive for %s %s (a Debian chroot; about a minute)\n", tool, arch, k.Version)
	start := time.Now()
	cmd := exec.CommandContext(ctx, "mmdebstrap", args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C.UTF-8", "DEBIAN_FRONTEND=noninteractive")
	cmd.Stdin = nil
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	tail := &lastLines{n: 25}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			fmt.Fprintln(logFile, line)
			tail.add(line)
			// mmdebstrap's own steps are the progress; the generator's
			// hundreds of lines stay in the log.
			if strings.HasPrefix(line, "I: ") && !strings.HasPrefix(line, "I: running --customize-hook") {
				fmt.Fprintf(log, "stock:   %s\n", strings.TrimPrefix(line, "I: "))
			}
		}
		io.Copy(io.Discard, pr)
	}()
	err = cmd.Run()
	pw.Close()
	<-done
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("stock: building the %s archive: %w", tool, ctx.Err())
		}
		return nil, fmt.Errorf("stock: building the %s archive with mmdebstrap failed (%v); last lines:\n%s", tool, err, tail.String())
	}
	if fi, err := os.Stat(filepath.Join(tmp, "initrd.img")); err != nil || fi.Size() == 0 {
		return nil, fmt.Errorf("stock: %s made no archive; last lines:\n%s", tool, tail.String())
	}
	if err := os.WriteFile(filepath.Join(tmp, ".complete"), []byte(time.Now().UTC().Format(time.RFC3339)+"\n"), 0o644); err != nil {
		return nil, fmt.Errorf("stock: %w", err)
	}
	logFile.Close()
	os.RemoveAll(dir)
	if err := os.Rename(tmp, dir); err != nil {
		return nil, fmt.Errorf("stock: %w", err)
	}
	a.Seconds = readSeconds(filepath.Join(dir, "seconds"))
	fi, _ := os.Stat(a.Path)
	fmt.Fprintf(log, "stock: %s archive for %s built in %.0fs: %s (%.1f MB)\n", tool, k.Version, time.Since(start).Seconds(), a.Path, float64(fi.Size())/1e6)
	return a, nil
}

// readSeconds reads the generator's start and end times, as date +%s.%N
// wrote them.
func readSeconds(p string) float64 {
	var t0, t1 float64
	b, err := os.ReadFile(p)
	if err != nil {
		return 0
	}
	if _, err := fmt.Sscan(string(b), &t0, &t1); err != nil {
		return 0
	}
	return t1 - t0
}

// hostArch is the host's Debian architecture.
func hostArch() string {
	if out, err := exec.Command("dpkg", "--print-architecture").Output(); err == nil {
		return strings.TrimSpace(string(out))
	}
	return runtime.GOARCH
}

// HostSources are the host's release codename and apt source files: the
// chroot is made from the same archive the cached kernel came from, and
// mmdebstrap pastes each file into the chroot's apt configuration.
func HostSources() (suite string, files []string, err error) {
	b, err := os.ReadFile("/etc/os-release")
	if err != nil {
		return "", nil, fmt.Errorf("stock: %w (a Debian host is needed)", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VERSION_CODENAME="); ok {
			suite = strings.Trim(v, `"'`)
		}
	}
	if suite == "" {
		return "", nil, errors.New("stock: /etc/os-release names no VERSION_CODENAME")
	}
	if b, err := os.ReadFile("/etc/apt/sources.list"); err == nil && hasEntries(b) {
		files = append(files, "/etc/apt/sources.list")
	}
	for _, pat := range []string{"*.list", "*.sources"} {
		m, _ := filepath.Glob(filepath.Join("/etc/apt/sources.list.d", pat))
		for _, f := range m {
			if b, err := os.ReadFile(f); err == nil && hasEntries(b) {
				files = append(files, f)
			}
		}
	}
	if len(files) == 0 {
		return "", nil, errors.New("stock: the host has no apt sources to make a chroot from")
	}
	return suite, files, nil
}

// hasEntries reports whether an apt sources file has anything but comments.
func hasEntries(b []byte) bool {
	for _, line := range bytes.Split(b, []byte("\n")) {
		line = bytes.TrimSpace(line)
		if len(line) > 0 && line[0] != '#' {
			return true
		}
	}
	return false
}

// quote makes s one word for sh.
func quote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// lastLines keeps the last n lines written to it.
type lastLines struct {
	n     int
	lines []string
}

func (t *lastLines) add(s string) {
	t.lines = append(t.lines, s)
	if len(t.lines) > t.n {
		t.lines = t.lines[len(t.lines)-t.n:]
	}
}

func (t *lastLines) String() string { return "  " + strings.Join(t.lines, "\n  ") }
