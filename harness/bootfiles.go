package harness

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"nbh.dev/nbh/fixtures"
	"nbh.dev/nbh/harness/archive"
	"nbh.dev/nbh/harness/bootcfg"
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/harness/sign"
	"nbh.dev/nbh/images"
	"nbh.dev/nbh/internal/fsutil"
)

// referenceArchive builds the guest's reference archive and the keeper that
// serves it, and returns its path. A network (NFS) root's archive carries a
// copy of the root's editable configuration, which the keeper keeps current;
// a local (iSCSI) root's carries none: the init reads it from the root.
func (g *Guest) referenceArchive(ctx context.Context, k *images.Kernel, p plan) (string, error) {
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
	if g.spec.Root == RootNFS {
		opts.Root = filepath.Join(g.lab.work, "roots", g.Name)
		opts.Tracked = []archive.Tracked{{Path: fixtures.ConfigPath, Editable: true}}
	}
	if p.skew {
		opts.Kernel = skewedKernel(k.Version)
	}
	if p.missingModule {
		opts.OmitModules = []string{rootDriver[g.spec.Root]}
	}
	kp := &keeper{g: g, k: k, opts: opts, refresh: !g.spec.NoArchiveRefresh && !p.noRefresh}
	if g.Profile.Firmware != qemu.Direct {
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
			if initrd, err = g.referenceArchive(ctx, k, p); err != nil {
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
	b := bootcfg.Boot{Server: l.Server(), Kernel: g.Name + "/vmlinuz", Initrd: g.Name + "/initrd.img", Cmdline: g.cmdline()}
	if p.loaderNFS {
		// Where a system that keeps its boot files on its root has them.
		b.NFS, b.Kernel, b.Initrd = p.nfsPath, "boot/vmlinuz", "boot/initrd.img"
	}
	firmwares := []string{g.Profile.Firmware}
	if g.spec.AnyLoader {
		firmwares = nil
		for _, c := range qemu.Profiles {
			if c.Arch == g.Profile.Arch && c.Firmware != qemu.Direct {
				firmwares = append(firmwares, c.Firmware)
			}
		}
	}
	for _, fw := range firmwares {
		if err = g.loaderFiles(ctx, fw, dir, b, p); err != nil {
			return "", "", fmt.Errorf("lab: %s boot files: %w", fw, err)
		}
	}
	return kernel, initrd, nil
}

// loaderFiles writes what firmware fw's loader reads: its script or config,
// and the loader image where the lab makes one.
func (g *Guest) loaderFiles(ctx context.Context, fw, dir string, b bootcfg.Boot, p plan) (err error) {
	l := g.lab
	switch fw {
	case qemu.SeaBIOSIPXE, qemu.OVMFIPXE, qemu.OVMFPXE:
		err = writeFile(filepath.Join(dir, "boot.ipxe"), []byte(bootcfg.IPXEScript(b)))
		if err == nil && fw == qemu.OVMFPXE {
			var src string
			if src, err = l.cache.Path(ctx, "amd64", images.IPXEEFI); err == nil {
				err = place(src, filepath.Join(l.srv, "ipxe.efi"))
			}
		}
	case qemu.UBoot:
		mac := strings.ReplaceAll(g.MAC.String(), ":", "-")
		err = writeFile(filepath.Join(l.srv, "pxelinux.cfg", "01-"+mac), []byte(bootcfg.PXELinux(b)))
		if err == nil {
			l.mu.Lock()
			if p.loaderNFS {
				l.ubootNFS[g.MAC.String()] = b
			}
			script := bootcfg.UBootScript(l.ubootNFS)
			err = fsutil.WriteAtomic(filepath.Join(l.srv, "boot.scr.uimg"), bootcfg.UBootImage("nbh boot script", script))
			l.mu.Unlock()
		}
	case qemu.AAVMFGRUB:
		cfg := filepath.Join(dir, "grub", "grub.cfg")
		err = writeFile(cfg, []byte(bootcfg.GRUBConfig(b)))
		var pubkey string
		if err == nil && p.sign {
			var key *sign.Key
			if key, err = l.signingKey(ctx); err == nil {
				pubkey = key.Public
				files := []string{cfg, filepath.Join(dir, "vmlinuz")}
				if g.keeper == nil {
					// The keeper signs the reference archive each time it
					// serves a build; another archive is signed here.
					files = append(files, filepath.Join(dir, "initrd.img"))
				}
				for _, f := range files {
					if _, serr := os.Stat(f); serr != nil {
						continue // missing-kernel: nothing to sign
					}
					if err = key.Sign(ctx, f); err != nil {
						break
					}
				}
			}
		}
		if err == nil {
			var mods string
			if mods, err = l.cache.Path(ctx, "arm64", images.GRUBArm64); err == nil {
				err = bootcfg.GRUBImage(ctx, mods, "(tftp)/"+g.Name+"/grub", filepath.Join(dir, "grubnetaa64.efi"), pubkey)
			}
		}
	}
	return err
}

func (g *Guest) firmwareFiles(ctx context.Context) (qemu.Files, error) {
	var f qemu.Files
	c := g.lab.cache
	get := func(dst *string, arch string, file images.File) error {
		p, err := c.Path(ctx, arch, file)
		*dst = p
		return err
	}
	var err error
	switch g.Profile.Firmware {
	case qemu.OVMFIPXE, qemu.OVMFPXE:
		err = errors.Join(get(&f.OVMFCode, "amd64", images.OVMFCode), get(&f.OVMFVars, "amd64", images.OVMFVars))
	case qemu.UBoot:
		if err = get(&f.UBoot, "arm64", images.UBoot); err == nil {
			f.UBootEnv, err = g.ubootEnv(f.UBoot)
		}
	case qemu.AAVMFGRUB:
		err = get(&f.AAVMF, "arm64", images.AAVMF)
	}
	return f, err
}

// ubootEnv writes the guest's U-Boot environment flash: the default
// environment with its MAC address (U-Boot 2023.01 reads a virtio NIC's MAC
// as its first byte six times over, 52:52:52:52:52:52, so DHCP leases and
// pxelinux.cfg/01-MAC would miss) and no autoboot delay.
func (g *Guest) ubootEnv(ubootBin string) (string, error) {
	bin, err := os.ReadFile(ubootBin)
	if err != nil {
		return "", err
	}
	env, err := bootcfg.UBootEnv(bin, map[string]string{"ethaddr": g.MAC.String(), "bootdelay": "0"})
	if err != nil {
		return "", err
	}
	path := filepath.Join(g.private, "uboot-env.fd")
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if _, err := f.Write(env); err != nil {
		return "", err
	}
	return path, f.Truncate(bootcfg.UBootFlashSize)
}
