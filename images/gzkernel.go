package images

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/klauspost/compress/gzip"
)

// Gzipped is the kernel image gzip-compressed, for a loader that
// decompresses what it reads (GRUB's gzio), as a distribution that ships
// its arm64 kernel compressed serves it. Debian 12's arm64 vmlinuz is the
// plain Image; compressed it is a third of the bytes. Made once per kernel
// package (a pinned package never changes) under the cache's kernels/; an
// image already compressed (gzip magic) is returned as it is.
func (c *Cache) Gzipped(k *Kernel) (string, error) {
	f, err := os.Open(k.Image)
	if err != nil {
		return "", fmt.Errorf("images: %w", err)
	}
	defer f.Close()
	magic := make([]byte, 2)
	if _, err := io.ReadFull(f, magic); err == nil && bytes.Equal(magic, []byte{0x1f, 0x8b}) {
		return k.Image, nil
	}
	// Named by the package folder the image is in (its name holds the
	// package's version).
	rel, err := filepath.Rel(filepath.Join(c.Dir, "pkgs"), k.Image)
	if err != nil || rel == "." || filepath.IsAbs(rel) || rel[0] == '.' {
		return "", fmt.Errorf("images: %s is not a cached package's kernel", k.Image)
	}
	out := filepath.Join(c.Dir, "kernels", rel+".gz")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	unlock, err := c.lock()
	if err != nil {
		return "", err
	}
	defer unlock()
	if _, err := os.Stat(out); err == nil {
		return out, nil // made while we waited
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", fmt.Errorf("images: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(out), ".gz-")
	if err != nil {
		return "", fmt.Errorf("images: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		tmp.Close()
		return "", fmt.Errorf("images: %w", err)
	}
	zw, _ := gzip.NewWriterLevel(tmp, gzip.BestCompression)
	_, err = io.Copy(zw, f)
	if err == nil {
		err = zw.Close()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("images: compressing %s: %w", k.Image, err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return "", fmt.Errorf("images: %w", err)
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return "", fmt.Errorf("images: %w", err)
	}
	return out, nil
}
