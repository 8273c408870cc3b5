package rootfs

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"gotest.tools/v3/assert"
)

// tree makes a small root with what a stock root has: a setuid binary, a
// sticky /tmp, symlinks, a hard link, and (as root) another owner and a
// device node.
func tree(t *testing.T) string {
	dir := filepath.Join(t.TempDir(), "root")
	for _, d := range []string{"usr/bin", "etc", "dev"} {
		assert.NilError(t, os.MkdirAll(filepath.Join(dir, d), 0o755))
	}
	su := filepath.Join(dir, "usr/bin/su")
	assert.NilError(t, os.WriteFile(su, []byte("su"), 0o755))
	assert.NilError(t, os.Chmod(su, 0o755|os.ModeSetuid))
	assert.NilError(t, os.Mkdir(filepath.Join(dir, "tmp"), 0o777))
	assert.NilError(t, os.Chmod(filepath.Join(dir, "tmp"), 0o777|os.ModeSticky))
	assert.NilError(t, os.Symlink("usr/bin", filepath.Join(dir, "bin")))
	assert.NilError(t, os.Symlink("/run/resolv.conf", filepath.Join(dir, "etc/resolv.conf")))
	assert.NilError(t, os.WriteFile(filepath.Join(dir, "etc/a"), []byte("a"), 0o644))
	assert.NilError(t, os.Link(filepath.Join(dir, "etc/a"), filepath.Join(dir, "etc/b")))
	if os.Geteuid() == 0 {
		assert.NilError(t, os.Chown(filepath.Join(dir, "etc/a"), 1234, 5678))
		assert.NilError(t, syscall.Mknod(filepath.Join(dir, "dev/null"), syscall.S_IFCHR|0o666, int(1<<8|3)))
	}
	return dir
}

func stat(t *testing.T, p string) *syscall.Stat_t {
	var st syscall.Stat_t
	assert.NilError(t, syscall.Lstat(p, &st))
	return &st
}

func TestCopyTreeKeepsWhatARootNeeds(t *testing.T) {
	src := filepath.Join(t.TempDir(), "link")
	assert.NilError(t, os.Symlink(tree(t), src)) // a tree given as a link to it
	dst := filepath.Join(t.TempDir(), "copy")
	assert.NilError(t, CopyTree(context.Background(), src, dst))
	fi, err := os.Lstat(dst)
	assert.NilError(t, err)
	assert.Assert(t, fi.IsDir(), "the copy is a %s", fi.Mode())
	assert.Equal(t, stat(t, filepath.Join(dst, "usr/bin/su")).Mode&0o7777, uint32(0o4755))
	assert.Equal(t, stat(t, filepath.Join(dst, "tmp")).Mode&0o7777, uint32(0o1777))
	link, err := os.Readlink(filepath.Join(dst, "etc/resolv.conf"))
	assert.NilError(t, err)
	assert.Equal(t, link, "/run/resolv.conf")
	a, b := stat(t, filepath.Join(dst, "etc/a")), stat(t, filepath.Join(dst, "etc/b"))
	assert.Equal(t, a.Ino, b.Ino, "the hard link")
	assert.Assert(t, a.Ino != stat(t, filepath.Join(src, "etc/a")).Ino, "a copy, not the user's file")
	if os.Geteuid() == 0 {
		assert.Equal(t, a.Uid, uint32(1234))
		assert.Equal(t, a.Gid, uint32(5678))
		assert.Equal(t, stat(t, filepath.Join(dst, "dev/null")).Mode&syscall.S_IFMT, uint32(syscall.S_IFCHR))
	}
}

func TestHashTreeFollowsContent(t *testing.T) {
	src := filepath.Join(t.TempDir(), "link")
	assert.NilError(t, os.Symlink(tree(t), src)) // a tree given as a link to it
	h1, err := HashTree(src)
	assert.NilError(t, err)
	h2, err := HashTree(src)
	assert.NilError(t, err)
	assert.Equal(t, h1.Hash, h2.Hash)
	assert.NilError(t, os.WriteFile(filepath.Join(src, "etc/a"), []byte("A"), 0o644))
	h3, err := HashTree(src)
	assert.NilError(t, err)
	assert.Assert(t, h3.Hash != h1.Hash, "a changed file, the same hash")
	assert.NilError(t, os.Chmod(filepath.Join(src, "etc/a"), 0o600))
	h4, _ := HashTree(src)
	assert.Assert(t, h4.Hash != h3.Hash, "a changed mode, the same hash")
}

// TestCachedExt4: the image holds the tree with its modes and owners (read
// back with e2fsprogs' debugfs, not nbh's code), and is made once per
// content.
func TestCachedExt4(t *testing.T) {
	if _, err := exec.LookPath("debugfs"); err != nil {
		t.Skip("debugfs (e2fsprogs) is not installed")
	}
	src := tree(t)
	cache := t.TempDir()
	img, err := CachedExt4(context.Background(), cache, src, nil)
	assert.NilError(t, err)
	out, err := exec.Command("debugfs", "-R", "stat /usr/bin/su", img).CombinedOutput()
	assert.NilError(t, err, string(out))
	assert.Assert(t, strings.Contains(string(out), "Mode:  04755"), string(out))
	if os.Geteuid() == 0 {
		out, _ = exec.Command("debugfs", "-R", "stat /etc/a", img).CombinedOutput()
		assert.Assert(t, strings.Contains(string(out), "User:  1234   Group:  5678"), string(out))
	}
	fi1, _ := os.Stat(img)
	again, err := CachedExt4(context.Background(), cache, src, nil)
	assert.NilError(t, err)
	assert.Equal(t, again, img)
	fi2, _ := os.Stat(again)
	assert.Assert(t, os.SameFile(fi1, fi2), "made again")
}
