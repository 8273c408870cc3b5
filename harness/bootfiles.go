package harness

import (
	"context"
	"fmt"
	"path/filepath"

	"nbh.dev/nbh/fixtures"
	"nbh.dev/nbh/harness/archive"
	"nbh.dev/nbh/harness/bootcfg"
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/harness/uki"
	"nbh.dev/nbh/images"
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
	b := bootcfg.Boot{Server: g.server(), Kernel: g.Name + "/vmlinuz", Initrd: g.Name + "/initrd.img", Cmdline: g.cmdline(), TFTP: g.spec.UserNet}
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
	return kernel, initrd, nil
}

// firmwareFiles fetches the chain's firmware images, and makes its
// environment flash.
func (g *Guest) firmwareFiles(ctx context.Context) (qemu.Files, error) {
	var f qemu.Files
	c, cache := g.chain, g.lab.cache
	var err error
	if c.Code != (images.File{}) {
		if f.Code, err = cache.Path(ctx, c.Arch, c.Code); err != nil {
			return f, err
		}
	}
	if c.Vars != (images.File{}) {
		if f.Vars, err = cache.Path(ctx, c.Arch, c.Vars); err != nil {
			return f, err
		}
	}
	if c.env != nil {
		f.Env, err = c.env(g, f.Code)
	}
	return f, err
}
