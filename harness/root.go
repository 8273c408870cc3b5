package harness

import (
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"nbh.dev/nbh/fixtures"
	"nbh.dev/nbh/harness/iscsi"
	"nbh.dev/nbh/harness/sandisk"
)

// iscsiRoot is the guest's root in dracut's netroot= spelling, with its
// CHAP credentials if withCHAP (its kernel command line, which only its
// own loader configuration carries) or without (DHCP's root path: no
// secret goes in a DHCP option).
func (g *Guest) iscsiRoot(withCHAP bool) string {
	creds := ""
	if g.chap != nil && withCHAP {
		secret := g.chap.Secret
		if g.plan.badCHAP {
			secret = "not-" + secret
		}
		creds = g.chap.User + ":" + secret + "@"
	}
	return fmt.Sprintf("iscsi:%s%s::%d:0:%s", creds, g.server(), iscsi.Port, g.plan.iqn)
}

// rootPath is where the guest's root is, as its command line names it:
// SERVER:/PATH for NFS, the iscsi: URI for iSCSI, "" for none.
func (g *Guest) rootPath() string {
	switch g.spec.Root {
	case RootNFS:
		return g.server() + ":" + g.plan.nfsPath
	case RootISCSI, RootSANBoot:
		return g.iscsiRoot(true)
	}
	return ""
}

// prepareRoot builds the guest's root, once per guest name in the lab: a
// guest booted again under the same name gets the same root back, as a
// machine rebooting would, with whatever it wrote.
func (g *Guest) prepareRoot(ctx context.Context) error {
	l := g.lab
	base := filepath.Join(l.work, "roots", g.Name)
	switch g.spec.Root {
	case RootNFS:
		if g.spec.RootDir != "" {
			var err error
			if base, err = g.userTree(ctx, base); err != nil {
				return err
			}
		} else if _, err := os.Stat(base); err != nil {
			tmp := base + ".tmp"
			os.RemoveAll(tmp)
			if err := fixtures.BuildRoot(ctx, l.cache, g.Profile.Arch, tmp, g.spec.RootFiles); err != nil {
				return err
			}
			if err := os.Rename(tmp, base); err != nil {
				return err
			}
		}
		for _, ip := range g.addrs() {
			if err := l.nfs.Export(NFSExport, ip, base); err != nil {
				return err
			}
		}
		root, err := os.OpenRoot(base)
		if err != nil {
			return err
		}
		g.rootFS, g.rootDir = root, base
	case RootISCSI, RootSANBoot:
		img := base + ".img"
		if g.spec.Root == RootSANBoot {
			img = base + ".disk"
		}
		if g.spec.RootDir != "" || g.spec.RootImage != "" {
			var err error
			if img, err = g.userImage(ctx, img); err != nil {
				return err
			}
		} else if _, err := os.Stat(img); err != nil {
			size := int64(64 << 20)
			for _, src := range g.spec.RootFiles {
				if fi, err := os.Stat(src); err == nil {
					size += fi.Size() + fi.Size()/8
				}
			}
			if err := os.MkdirAll(filepath.Dir(img), 0o755); err != nil {
				return err
			}
			if err := g.buildRootDisk(ctx, img+".tmp", size); err != nil {
				os.Remove(img + ".tmp")
				return err
			}
			if err := os.Rename(img+".tmp", img); err != nil {
				return err
			}
		}
		g.disk = img
		lun, err := iscsi.OpenLUN(img, g.Name)
		if err != nil {
			return err
		}
		g.lun = lun
		var chap *iscsi.CHAP
		if g.spec.CHAP || g.plan.badCHAP {
			secret := make([]byte, 8)
			io.ReadFull(g.rand, secret)
			chap = &iscsi.CHAP{User: "nbh-" + g.Name, Secret: hex.EncodeToString(secret)}
			g.chap = chap
		}
		for _, ip := range g.addrs() {
			l.iscsi.Export(ISCSITarget, ip, lun, chap)
		}
	}
	return nil
}

// buildRootDisk writes the guest's iSCSI LUN: the reference root as an ext4
// image of size bytes, or for a SAN boot a whole disk with the root as its
// second partition (the loader step fills the first, the ESP: sanbootDisk).
func (g *Guest) buildRootDisk(ctx context.Context, img string, size int64) error {
	l := g.lab
	if g.spec.Root != RootSANBoot {
		return fixtures.BuildRootImage(ctx, l.cache, g.Profile.Arch, img, size, g.spec.RootFiles)
	}
	layout := sandisk.Plan(size)
	if err := sandisk.Create(img, layout); err != nil {
		return err
	}
	return fixtures.BuildRootPartition(ctx, l.cache, g.Profile.Arch, img, layout.RootStart, layout.RootSize, g.spec.RootFiles)
}
