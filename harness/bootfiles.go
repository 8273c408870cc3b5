package harness

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"nbh.dev/nbh/fixtures"
	"nbh.dev/nbh/harness/archive"
	"nbh.dev/nbh/harness/bootcfg"
	"nbh.dev/nbh/harness/dhcp"
	"nbh.dev/nbh/harness/efivars"
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/harness/uki"
	"nbh.dev/nbh/images"
	"nbh.dev/nbh/internal/fsutil"
)

// referenceArchive builds the guest's reference archive and the keeper that
// serves it, and returns its path. A network (NFS) root's archive carries a
// copy of the root's editable configuration, which the keeper keeps current;
// a local (iSCSI) root's carries none: the init reads it from the root.
func (g *Guest) referenceArchive(ctx context.Context, k *images.Kernel, kernel string, p plan) (string, error) {
	opts := fixtures.Options{Extra: g.spec.ArchiveFiles, Compression: g.spec.Compression}
	if g.lab.esp != nil {
		// The ESP modules always; the keys unless a fault leaves them out.
		// An archive with keys is built in the lab's own cache, which goes
		// with the lab: keys are never kept.
		opts.ESP = true
		if g.espConf != nil {
			opts.Secrets = map[string][]byte{ESPConfPath: g.espConf}
			opts.CacheDir = filepath.Join(g.lab.work, "archives")
		}
	}
	switch {
	case g.spec.Root == RootNFS && g.spec.RootDir == "":
		opts.Root = g.rootDir
		opts.Tracked = []archive.Tracked{{Path: fixtures.ConfigPath, Editable: true}}
	case g.spec.Root == RootNFS && len(g.spec.ArchiveFromRoot) > 0:
		// The user's root's own files, kept current by the keeper; with
		// the user's kernel, that kernel's modules from the root.
		list, err := archive.ReadList(strings.NewReader(strings.Join(g.spec.ArchiveFromRoot, "\n")))
		if err != nil {
			return "", fmt.Errorf("archive from root: %w", err)
		}
		if opts.Tracked, err = archive.ExpandList(g.rootDir, list); err != nil {
			return "", fmt.Errorf("archive from root: %w", err)
		}
		opts.Root = g.rootDir
		if g.spec.Kernel != "" {
			if k, err = fixtures.RootKernel(g.rootDir, g.Profile.Arch, ""); err != nil {
				return "", fmt.Errorf("archive from root: %w", err)
			}
			opts.TheirKernel = true
		}
	}
	// (Otherwise a root of the user's lends the archive none of its files;
	// the server compares the archive with it at the mount.)
	if p.skew {
		opts.Kernel = skewedKernel(k.Version)
	}
	if p.missingModule {
		opts.OmitModules = []string{rootDriver[g.spec.Root]}
	}
	kp := &keeper{g: g, k: k, opts: opts, refresh: !g.spec.NoArchiveRefresh && !p.noRefresh}
	// A guest ready for any loader (nbh serve) gets the plain archive;
	// its image is made once from it (ukiLoader).
	packed := g.chain.Stub.Path != "" && !g.spec.AnyLoader
	switch {
	case packed && p.noKernel:
		// No kernel, no Unified Kernel Image: nothing is served.
	case packed:
		// The archive is served inside the guest's Unified Kernel Image,
		// rebuilt with it.
		kp.served = filepath.Join(g.lab.srv, g.Name, ukiName)
		kp.pack = func(ctx context.Context, archive, dst string) (uki.Layout, error) {
			return g.buildUKI(ctx, g.chain.Stub, kernel, archive, dst)
		}
	case g.Profile.Firmware != qemu.Direct:
		kp.served = filepath.Join(g.lab.srv, g.Name, "initrd.img")
	}
	kp.mu.Lock()
	err := kp.build(ctx, "build", "boot of "+g.Name)
	kp.mu.Unlock()
	if err != nil {
		return "", err
	}
	if p.editConfig {
		if err := kp.edit("site=changed-after-the-archive-was-built"); err != nil {
			return "", err
		}
	}
	g.keeper = kp
	if kp.served == "" {
		// QEMU loads the archive itself: this is the fetch.
		if err := kp.fresh(ctx); err != nil {
			return "", err
		}
	}
	return kp.path(), nil
}

// bootFiles prepares the kernel and archive, and the loader configs in the
// served root, according to the plan.
func (g *Guest) bootFiles(ctx context.Context, p plan) (kernel, initrd string, err error) {
	l := g.lab
	kernel, initrd = g.spec.Kernel, g.spec.Initrd
	if kernel == "" || initrd == "" {
		k, err := l.cache.Kernel(ctx, g.Profile.Arch)
		if err != nil {
			return "", "", err
		}
		if kernel == "" {
			kernel = k.Image
		}
		if initrd == "" {
			if initrd, err = g.referenceArchive(ctx, k, kernel, p); err != nil {
				return "", "", err
			}
		}
	}
	if g.Profile.Firmware == qemu.Direct {
		return kernel, initrd, nil
	}
	dir := filepath.Join(l.srv, g.Name)
	if !p.noKernel {
		if err := place(kernel, filepath.Join(dir, "vmlinuz")); err != nil {
			return "", "", fmt.Errorf("lab: %w", err)
		}
	}
	if g.keeper == nil {
		if err := place(initrd, filepath.Join(dir, "initrd.img")); err != nil {
			return "", "", fmt.Errorf("lab: %w", err)
		}
	}
	b := bootcfg.Boot{Server: g.server(), Kernel: g.Name + "/vmlinuz", Initrd: g.Name + "/initrd.img", Cmdline: g.cmdline(), TFTP: g.spec.UserNet,
		Guest: g.Name, MAC: g.MAC.String(), IP: g.IP, Arch: g.Profile.Arch, Firmware: g.Profile.Firmware, Root: g.spec.Root, RootPath: g.rootPath()}
	if g.spec.Family == dhcp.V6 {
		b.IP = g.IP6
	}
	if p.loaderNFS {
		// Where a system that keeps its boot files on its root has them.
		b.NFS, b.Kernel, b.Initrd = p.nfsPath, "boot/vmlinuz", "boot/initrd.img"
	}
	chains := []Chain{g.chain}
	if g.spec.AnyLoader {
		chains = loaderChains(g.Profile.Arch)
	}
	for _, c := range chains {
		if c.loader == nil {
			continue
		}
		if err = c.loader(ctx, g, dir, b, p); err != nil {
			return "", "", fmt.Errorf("lab: %s boot files: %w", c.Firmware, err)
		}
	}
	if g.spec.Loader != "" {
		// The user's loader binary in the guest's folder, where its DHCP
		// answer names it (DHCPRule.Loader), beside what nbh wrote there.
		dst := filepath.Join(dir, g.loaderName())
		if _, err := os.Lstat(dst); err == nil && !fsutil.SameContent(g.spec.Loader, dst) {
			return "", "", fmt.Errorf("loader %s: its name is taken by nbh's own %s in the guest's folder; rename it", g.spec.Loader, g.loaderName())
		}
		if err := place(g.spec.Loader, dst); err != nil {
			return "", "", fmt.Errorf("lab: %w", err)
		}
	}
	return kernel, initrd, nil
}

// firmwareFiles fetches the chain's firmware images, and makes its
// environment flash.
func (g *Guest) firmwareFiles(ctx context.Context) (qemu.Files, error) {
	var f qemu.Files
	c, cache := g.chain, g.lab.cache
	var err error
	switch {
	case g.spec.FirmwareCode != "":
		f.Code = g.spec.FirmwareCode
	case g.spec.BIOS != "":
		f.Code = g.spec.BIOS
	case c.Code != (images.File{}):
		if f.Code, err = cache.Path(ctx, c.Arch, c.Code); err != nil {
			return f, err
		}
	}
	switch {
	case g.spec.FirmwareVars != "":
		f.Vars = g.spec.FirmwareVars
	case c.Vars != (images.File{}):
		if f.Vars, err = cache.Path(ctx, c.Arch, c.Vars); err != nil {
			return f, err
		}
	}
	if c.vars6 != nil && g.spec.Family == dhcp.V6 {
		if f.Vars, err = c.vars6(g, f.Vars); err != nil {
			return f, fmt.Errorf("firmware variables: %w", err)
		}
	}
	if c.env != nil {
		f.Env, err = c.env(g, f.Code)
	}
	return f, err
}

// netBootV6First writes the guest's copy of AAVMF's (blank) variables with
// its NIC's PXEv6 and HTTPv6 boot options first in the boot order, as a
// user would set them in the firmware's boot manager: AAVMF, unlike OVMF,
// cannot be told to leave IPv4 out, and its HTTPv4 option asks DHCPv4 for a
// minute first. PXEv6 before HTTPv6 for the reason in httpV6. The NIC is
// the first PCI device nbh gives QEMU: Pci(0x1,0x0).
func netBootV6First(g *Guest, vars string) (string, error) {
	// Only the head of the 64 MiB bank holds variables (ArmVirtVolume); the
	// rest is unused and written as a hole.
	src, err := os.Open(vars)
	if err != nil {
		return "", err
	}
	defer src.Close()
	fi, err := src.Stat()
	if err != nil {
		return "", err
	}
	b := make([]byte, efivars.ArmVirtVolume)
	if _, err := io.ReadFull(src, b); err != nil {
		return "", fmt.Errorf("%s: %w", vars, err)
	}
	if _, err := efivars.Open(b); err != nil {
		if g.spec.FirmwareVars != "" {
			// The user's store is theirs: nbh formats only Debian's blank one.
			return "", fmt.Errorf("%s: nbh cannot add its IPv6 boot options to this variable store (%v); put UEFI PXEv6 and HTTPv6 first in its boot order yourself, or leave --firmware-vars out", vars, err)
		}
		if err := efivars.Format(b); err != nil {
			return "", err
		}
	}
	s, err := efivars.Open(b)
	if err != nil {
		return "", err
	}
	nic := efivars.NICPath(1, g.MAC)
	ipv6 := append(slices.Clip(nic), efivars.IPv6Node()...)
	if err := s.SetBootOrder(
		efivars.LoadOption(efivars.NetBootDescription("PXEv6", g.MAC), append(slices.Clip(ipv6), efivars.End()...)),
		efivars.LoadOption(efivars.NetBootDescription("HTTPv6", g.MAC), append(append(slices.Clip(ipv6), efivars.URINode()...), efivars.End()...)),
	); err != nil {
		return "", err
	}
	path := filepath.Join(g.private, "vars-ipv6.fd")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return "", err
	}
	return path, os.Truncate(path, fi.Size())
}
