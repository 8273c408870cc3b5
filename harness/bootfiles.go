package harness

import (
	"context"
	"crypto/sha256"
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
	"nbh.dev/nbh/harness/secureboot"
	"nbh.dev/nbh/harness/timeline"
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
	if m, err := qemu.LookupNIC(g.spec.NIC); err == nil {
		opts.NICDriver = m.Driver
	}
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
	var k *images.Kernel // the reference kernel, when the boot uses it
	if kernel == "" || initrd == "" {
		if k, err = l.cache.Kernel(ctx, g.Profile.Arch); err != nil {
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
		served := kernel
		if g.chain.GzipKernel && g.spec.Kernel == "" {
			if served, err = l.cache.Gzipped(k); err != nil {
				return "", "", err
			}
		}
		if err := place(served, filepath.Join(dir, "vmlinuz")); err != nil {
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
// environment flash; with Secure Boot, the firmware that enforces it and
// the guest's copy of its variables with the lab's keys enrolled.
func (g *Guest) firmwareFiles(ctx context.Context) (qemu.Files, error) {
	var f qemu.Files
	c, cache := g.chain, g.lab.cache
	code, vars := c.Code, c.Vars
	if c.SecureBoot {
		code, vars = c.Secure.Code, c.Secure.Vars
	}
	var err error
	switch {
	case g.spec.FirmwareCode != "":
		f.Code = g.spec.FirmwareCode
	case g.spec.BIOS != "":
		f.Code = g.spec.BIOS
	case code != (images.File{}):
		if f.Code, err = cache.Path(ctx, c.Arch, code); err != nil {
			return f, err
		}
	}
	switch {
	case g.spec.FirmwareVars != "":
		f.Vars = g.spec.FirmwareVars
	case vars != (images.File{}):
		if f.Vars, err = cache.Path(ctx, c.Arch, vars); err != nil {
			return f, err
		}
	}
	if c.NICROM && g.spec.NICROM == "" {
		// The NIC's iPXE ROM boots the guest: the pinned one, not the
		// host's.
		if f.ROMs, err = cache.Path(ctx, c.Arch, images.IPXEROMs()); err != nil {
			return f, err
		}
	}
	if c.Payload != (images.File{}) {
		if f.Payload, err = cache.Path(ctx, c.Arch, c.Payload); err != nil {
			return f, err
		}
	}
	if c.SecureBoot {
		if f.Vars, err = g.secureBootVars(f.Vars); err != nil {
			return f, fmt.Errorf("firmware variables: %w", err)
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

// secureBootVars writes the guest's copy of the Secure Boot firmware's
// variables with what this boot adds to them: in db the lab's certificate
// (when the lab signs the image the firmware starts) and the user's
// (Spec.SecureBootCerts); in dbx, for dbx-revoked, the hash of the image
// the firmware starts. With nothing to add, vars as they are.
func (g *Guest) secureBootVars(vars string) (string, error) {
	var db [][]byte
	if g.chain.signsImage() {
		key, err := g.lab.secureBootKey()
		if err != nil {
			return "", err
		}
		db = append(db, key.CertDER)
	}
	for _, p := range g.spec.SecureBootCerts {
		certs, err := secureboot.ReadCerts(p)
		if err != nil {
			return "", fmt.Errorf("db certificate: %w", err)
		}
		db = append(db, certs...)
	}
	var dbx [][sha256.Size]byte
	if g.plan.dbxRevoked {
		img := g.firstImage()
		b, err := os.ReadFile(img)
		if err != nil {
			return "", fmt.Errorf("dbx-revoked: %w", err)
		}
		h, err := secureboot.Hash(b)
		if err != nil {
			return "", fmt.Errorf("dbx-revoked: %s: %w", img, err)
		}
		dbx = append(dbx, h)
		g.lab.tl.Emit(timeline.Event{Source: "lab", Kind: "fired", Guest: g.Name,
			Msg:    fmt.Sprintf("dbx-revoked: %s's hash %x is in the firmware's dbx", filepath.Base(img), h),
			Detail: map[string]any{"fault": "dbx-revoked", "sha256": fmt.Sprintf("%x", h)}})
	}
	if len(db) == 0 && len(dbx) == 0 {
		return vars, nil
	}
	return editVars(vars, filepath.Join(g.private, "vars-secure.fd"), func(b []byte) error {
		s, err := efivars.Open(b)
		if err != nil {
			return fmt.Errorf("%s: nbh cannot enroll keys in this variable store (%v); enroll them yourself, or leave --firmware-vars out", vars, err)
		}
		for _, der := range db {
			if err := s.AppendSigList("db", efivars.X509List(labOwner, der)); err != nil {
				return err
			}
		}
		if len(dbx) > 0 {
			return s.AppendSigList("dbx", efivars.SHA256List(labOwner, dbx...))
		}
		return nil
	})
}

// labOwner is the owner GUID of the signatures nbh enrolls (any GUID the
// firmware does not give a meaning to).
var labOwner, _ = efivars.ParseGUID("6E624800-0000-4E42-4800-6E6268000001")

// firstImage is the EFI image the guest's firmware starts: the Unified
// Kernel Image, or the loader DHCP offers (shim, iPXE, or the user's own).
func (g *Guest) firstImage() string {
	dir := filepath.Join(g.lab.srv, g.Name)
	if g.chain.Stub.Path != "" {
		return filepath.Join(dir, ukiName)
	}
	if n := g.servedLoader(); n != "" {
		return filepath.Join(dir, n)
	}
	for _, r := range g.chain.DHCP {
		if r.Loader {
			if own, ok := strings.CutPrefix(r.File, "{guest}/"); ok {
				return filepath.Join(dir, own)
			}
			return filepath.Join(g.lab.srv, r.File)
		}
	}
	return ""
}

// editVars writes a copy of the variables flash src to dst, edited by fn.
// fn gets the head of the flash that can hold the variable store (AAVMF's
// 64 MiB bank holds it in its first ArmVirtVolume bytes, written back over
// a hole; OVMF's whole file is smaller).
func editVars(src, dst string, fn func(b []byte) error) (string, error) {
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return "", err
	}
	b := make([]byte, min(fi.Size(), efivars.ArmVirtVolume))
	if _, err := io.ReadFull(in, b); err != nil {
		return "", fmt.Errorf("%s: %w", src, err)
	}
	if err := fn(b); err != nil {
		return "", err
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		return "", err
	}
	return dst, os.Truncate(dst, fi.Size())
}

// netBootV6First writes the guest's copy of AAVMF's (blank) variables with
// its NIC's PXEv6 and HTTPv6 boot options first in the boot order, as a
// user would set them in the firmware's boot manager: AAVMF, unlike OVMF,
// cannot be told to leave IPv4 out, and its HTTPv4 option asks DHCPv4 for a
// minute first. PXEv6 before HTTPv6 for the reason in httpV6. The NIC is
// the first PCI device nbh gives QEMU: Pci(0x1,0x0).
func netBootV6First(g *Guest, vars string) (string, error) {
	return editVars(vars, filepath.Join(g.private, "vars-ipv6.fd"), func(b []byte) error {
		if _, err := efivars.Open(b); err != nil {
			if g.spec.FirmwareVars != "" {
				// The user's store is theirs: nbh formats only Debian's blank one.
				return fmt.Errorf("%s: nbh cannot add its IPv6 boot options to this variable store (%v); put UEFI PXEv6 and HTTPv6 first in its boot order yourself, or leave --firmware-vars out", vars, err)
			}
			if err := efivars.Format(b); err != nil {
				return err
			}
		}
		s, err := efivars.Open(b)
		if err != nil {
			return err
		}
		nic := efivars.NICPath(1, g.MAC)
		ipv6 := append(slices.Clip(nic), efivars.IPv6Node()...)
		return s.SetBootOrder(
			efivars.LoadOption(efivars.NetBootDescription("PXEv6", g.MAC), append(slices.Clip(ipv6), efivars.End()...)),
			efivars.LoadOption(efivars.NetBootDescription("HTTPv6", g.MAC), append(append(slices.Clip(ipv6), efivars.URINode()...), efivars.End()...)),
		)
	})
}
