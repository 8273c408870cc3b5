package harness

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"

	"nbh.dev/nbh/harness/rootfs"
)

// checkUserRoot checks Spec.RootDir, RootImage and RootWritable against the
// root they are for.
func checkUserRoot(s Spec) error {
	if s.RootDir == "" && s.RootImage == "" {
		if s.RootWritable {
			return fmt.Errorf("root writable: no root of the user's (root dir or root image) to write to")
		}
		return nil
	}
	switch {
	case s.RootDir != "" && s.RootImage != "":
		return fmt.Errorf("root: a root dir or a root image, not both")
	case s.Root != RootNFS && s.Root != RootISCSI:
		return fmt.Errorf("root: a root tree or image of your own is for --root nfs or --root iscsi (a SAN boot's disk is nbh's own)")
	case s.Root == RootNFS && s.RootImage != "":
		return fmt.Errorf("root image %s: NFS serves a tree, and nbh does not read file-system images in user space: give the tree (--root-dir), or serve the image over iSCSI (--root iscsi)", s.RootImage)
	case s.Root == RootISCSI && s.RootDir != "" && s.RootWritable:
		return fmt.Errorf("root writable: an iSCSI root made from a tree is an image of it, which the tree never sees; serve the tree over NFS to write to it, or make the image yourself (--root-image)")
	case len(s.RootFiles) > 0 && (s.RootImage != "" || s.Root == RootISCSI):
		return fmt.Errorf("root files: added to a tree served over NFS only (an image is used as it is)")
	}
	if s.RootDir != "" {
		if fi, err := os.Stat(s.RootDir); err != nil || !fi.IsDir() {
			return fmt.Errorf("root dir %s: not a folder", s.RootDir)
		}
	}
	if s.RootImage != "" {
		if fi, err := os.Stat(s.RootImage); err != nil || !fi.Mode().IsRegular() {
			return fmt.Errorf("root image %s: not a file", s.RootImage)
		}
	}
	return nil
}

// userTree is the guest's NFS root from the user's tree: the tree itself
// with RootWritable, else the guest's own copy at base, made once per guest
// name in the lab (a reboot keeps what the guest wrote), with RootFiles.
func (g *Guest) userTree(ctx context.Context, base string) (string, error) {
	if g.spec.RootWritable {
		return g.spec.RootDir, g.addRootFiles(g.spec.RootDir)
	}
	if _, err := os.Stat(base); err == nil {
		return base, nil
	}
	tmp := base + ".tmp"
	os.RemoveAll(tmp)
	fmt.Fprintf(g.lab.log, "lab: %s: copying the root tree %s\n", g.Name, g.spec.RootDir)
	if err := rootfs.CopyTree(ctx, g.spec.RootDir, tmp); err != nil {
		return "", err
	}
	if err := g.addRootFiles(tmp); err != nil {
		os.RemoveAll(tmp)
		return "", err
	}
	return base, os.Rename(tmp, base)
}

// addRootFiles writes RootFiles into the tree at dir through an os.Root:
// a symlink of the tree (etc/resolv.conf -> /run/...) is replaced by the
// file, never followed out of the tree to a host file.
func (g *Guest) addRootFiles(dir string) error {
	if len(g.spec.RootFiles) == 0 {
		return nil
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return fmt.Errorf("root files: %w", err)
	}
	defer root.Close()
	for dst, src := range g.spec.RootFiles {
		name := strings.TrimLeft(path.Clean("/"+filepath.ToSlash(dst)), "/")
		if name == "" {
			return fmt.Errorf("root files: %q names the root itself", dst)
		}
		data, err := os.ReadFile(src)
		if err != nil {
			return fmt.Errorf("root files: %w", err)
		}
		if err := root.MkdirAll(path.Dir(name), 0o755); err != nil {
			return fmt.Errorf("root files: %s: %w", dst, err)
		}
		if fi, err := root.Lstat(name); err == nil && fi.Mode()&fs.ModeSymlink != 0 {
			if err := root.Remove(name); err != nil {
				return fmt.Errorf("root files: %s: %w", dst, err)
			}
		}
		if err := root.WriteFile(name, data, 0o644); err != nil {
			return fmt.Errorf("root files: %s: %w", dst, err)
		}
	}
	return nil
}

// userImage is the guest's iSCSI LUN from the user's image, or from an
// ext4 image of the user's tree (cached by the tree's content): the image
// itself with RootWritable, else the guest's own copy at img, made once per
// guest name in the lab.
func (g *Guest) userImage(ctx context.Context, img string) (string, error) {
	src := g.spec.RootImage
	if g.spec.RootDir != "" {
		var err error
		if src, err = rootfs.CachedExt4(ctx, filepath.Join(g.lab.cache.Dir, "rootimages"), g.spec.RootDir, g.lab.log); err != nil {
			return "", err
		}
	} else if g.spec.RootWritable {
		return src, nil
	}
	if _, err := os.Stat(img); err == nil {
		return img, nil
	}
	if err := os.MkdirAll(filepath.Dir(img), 0o755); err != nil {
		return "", err
	}
	if err := rootfs.CopyImage(ctx, src, img+".tmp"); err != nil {
		return "", err
	}
	return img, os.Rename(img+".tmp", img)
}
