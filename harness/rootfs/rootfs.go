// Package rootfs turns a user's root file system — a tree such as
// mmdebstrap or a build system makes, or a disk or file-system image — into
// what the lab serves a guest: a private copy of the tree for NFS, an ext4
// image of it for iSCSI (mke2fs -d, cached by the tree's content), a
// private copy of an image. The user's files are only read. Copies keep
// ownership, modes (setuid, sticky), symlinks, hard links and device nodes
// as the tree has them; they are made with cp -a --reflink=auto, so on a
// file system with reflinks (btrfs, XFS) a copy shares the data blocks until
// the guest writes them.
package rootfs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"nbh.dev/nbh/internal/fsutil"
)

// CopyTree copies the tree src to dst (which must not exist) with
// everything a root needs: owners (as root), modes, symlinks, hard links,
// device nodes, extended attributes.
func CopyTree(ctx context.Context, src, dst string) error {
	// A tree given as a link to it: copy the tree, not the link (which
	// would send the guest's writes into the user's files).
	src, err := filepath.EvalSymlinks(src)
	if err != nil {
		return fmt.Errorf("rootfs: %w", err)
	}
	fi, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("rootfs: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("rootfs: %s is not a folder", src)
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return fmt.Errorf("rootfs: %w", err)
	}
	out, err := exec.CommandContext(ctx, "cp", "-a", "--reflink=auto", "--", src, dst).CombinedOutput()
	if err != nil {
		os.RemoveAll(dst)
		msg := strings.TrimSpace(string(out))
		if os.Geteuid() != 0 && strings.Contains(msg, "Operation not permitted") {
			msg += " (as a user other than root, device nodes cannot be copied: give a tree without them, or --root-writable to serve the tree itself)"
		}
		return fmt.Errorf("rootfs: copy %s: %v: %s", src, err, msg)
	}
	return nil
}

// CopyImage copies the image src to dst, sparse (and reflinked where the
// file system can).
func CopyImage(ctx context.Context, src, dst string) error {
	fi, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("rootfs: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("rootfs: image %s is not a regular file", src)
	}
	out, err := exec.CommandContext(ctx, "cp", "--sparse=always", "--reflink=auto", "--", src, dst).CombinedOutput()
	if err != nil {
		os.Remove(dst)
		return fmt.Errorf("rootfs: copy %s: %v: %s", src, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Ext4 writes the tree as an ext4 file system of size bytes at byte offset
// of img (0: the whole file), with mkfs.ext4 -d: no root privileges needed;
// owners and modes come from the tree's files.
func Ext4(ctx context.Context, tree, img string, offset, size int64) error {
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		return fmt.Errorf("rootfs: mkfs.ext4 is not installed (Debian package e2fsprogs): %w", err)
	}
	args := []string{"-q", "-F", "-L", "nbhroot", "-d", tree}
	if offset > 0 {
		// nodiscard: discarding a partition of a file would punch the
		// whole file's range, other partitions included.
		args = append(args, "-E", fmt.Sprintf("offset=%d,nodiscard", offset))
	}
	args = append(args, img, fmt.Sprintf("%dk", size/1024))
	out, err := exec.CommandContext(ctx, mkfs, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("rootfs: mkfs.ext4: %v: %s", err, out)
	}
	return nil
}

// Tree is what a tree's hash walk found.
type Tree struct {
	Hash  string // of every entry's name, type, mode, owner, device, link target and content
	Bytes int64  // the regular files' sizes added up
	Files int    // entries
}

// HashTree hashes the tree at dir by content, for a cache of what is made
// from it (an image): the same tree hashes the same wherever it lies.
func HashTree(dir string) (Tree, error) {
	h := sha256.New()
	var t Tree
	dir, err := filepath.EvalSymlinks(dir) // a link to the tree: walk the tree
	if err != nil {
		return Tree{}, fmt.Errorf("rootfs: %w", err)
	}
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		var uid, gid uint32
		var rdev uint64
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			uid, gid, rdev = st.Uid, st.Gid, uint64(st.Rdev)
		}
		fmt.Fprintf(h, "%q %o %d %d %d", rel, fi.Mode(), uid, gid, rdev)
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(h, " -> %q", target)
		case fi.Mode().IsRegular():
			sum, err := fsutil.SHA256File(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(h, " %d %s", fi.Size(), sum)
			t.Bytes += fi.Size()
		}
		h.Write([]byte{'\n'})
		t.Files++
		return nil
	})
	if err != nil {
		return Tree{}, fmt.Errorf("rootfs: hash %s: %w", dir, err)
	}
	t.Hash = hex.EncodeToString(h.Sum(nil))
	return t, nil
}

// ImageSize is the size of an ext4 image that holds a tree: its bytes with
// a quarter more for metadata and inodes, and 64 MiB for the guest to write.
func ImageSize(t Tree) int64 {
	size := t.Bytes + t.Bytes/4 + int64(t.Files)*4096 + 64<<20
	return (size + 1<<20 - 1) &^ (1<<20 - 1)
}

// CachedExt4 returns an ext4 image of the tree at dir from cacheDir, made
// (mkfs.ext4 -d) if the tree's content has none yet. Never modify it: copy
// it (CopyImage) for a guest.
func CachedExt4(ctx context.Context, cacheDir, dir string, progress io.Writer) (string, error) {
	dir, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return "", fmt.Errorf("rootfs: %w", err)
	}
	t, err := HashTree(dir)
	if err != nil {
		return "", err
	}
	img := filepath.Join(cacheDir, t.Hash[:32]+".ext4")
	if _, err := os.Stat(img); err == nil {
		now := time.Now()
		os.Chtimes(img, now, now)
		return img, nil
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", fmt.Errorf("rootfs: %w", err)
	}
	unlock, err := fsutil.LockDir(cacheDir)
	if err != nil {
		return "", err
	}
	defer unlock()
	if _, err := os.Stat(img); err == nil {
		return img, nil // made by another process meanwhile
	}
	if progress != nil {
		fmt.Fprintf(progress, "rootfs: making an ext4 image of %s (%d entries, %d MB)\n", dir, t.Files, t.Bytes>>20)
	}
	tmp := img + ".tmp"
	os.Remove(tmp)
	if err := Ext4(ctx, dir, tmp, 0, ImageSize(t)); err != nil {
		os.Remove(tmp)
		return "", err
	}
	return img, os.Rename(tmp, img)
}
