// Package archive builds boot archives (initramfs): cpio "newc" streams,
// gzip- or zstd-compressed, reproducible (entries sorted, fixed mtimes and
// owners, so the same inputs give byte-identical output), with a manifest
// inside listing every file with its size, SHA-256 and source — for copies of
// the root file system's files, the root path, so a freshness check can tell
// when the archive has gone stale (package manifest). Build makes an archive
// from a declared Spec through a content-addressed cache.
package archive

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"nbh.dev/nbh/harness/archive/manifest"
)

// ManifestPath is where the manifest lives inside an archive.
const ManifestPath = manifest.Path

// Manifest describes an archive's files (see package manifest).
type Manifest = manifest.Manifest

// Compressions a builder writes.
const (
	Gzip = "gzip"
	Zstd = "zstd"
)

type entry struct {
	mode     uint32    // full st_mode
	rdev     [2]uint32 // device major, minor
	data     []byte    // regular files; symlink target
	source   string
	editable bool
	secret   bool
}

// Builder collects entries; parents are created as needed.
type Builder struct {
	entries map[string]*entry
	// Kernel is recorded in the manifest.
	Kernel string
	// Compression is Gzip (the default) or Zstd.
	Compression string
}

// New returns an empty builder.
func New() *Builder { return &Builder{entries: map[string]*entry{}} }

const (
	sIFDIR = 0o040000
	sIFREG = 0o100000
	sIFLNK = 0o120000
	sIFCHR = 0o020000
)

func clean(p string) (string, error) {
	c := strings.TrimPrefix(path.Clean("/"+p), "/")
	if c == "" || c == "." {
		return "", fmt.Errorf("archive: bad path %q", p)
	}
	return c, nil
}

func (b *Builder) parents(p string) {
	for d := path.Dir(p); d != "." && d != "/"; d = path.Dir(d) {
		if _, ok := b.entries[d]; !ok {
			b.entries[d] = &entry{mode: sIFDIR | 0o755}
		}
	}
}

// Dir adds a directory.
func (b *Builder) Dir(p string, perm os.FileMode) error {
	c, err := clean(p)
	if err != nil {
		return err
	}
	b.parents(c)
	b.entries[c] = &entry{mode: sIFDIR | uint32(perm.Perm())}
	return nil
}

// File adds a regular file with the given contents.
func (b *Builder) File(p string, data []byte, perm os.FileMode) error {
	return b.file(p, data, perm, "")
}

func (b *Builder) file(p string, data []byte, perm os.FileMode, source string) error {
	c, err := clean(p)
	if err != nil {
		return err
	}
	b.parents(c)
	b.entries[c] = &entry{mode: sIFREG | uint32(perm.Perm()), data: data, source: source}
	return nil
}

// Secret adds a file whose contents are never shown: the manifest marks it
// secret and reports print no more than a short hash of it.
func (b *Builder) Secret(p string, data []byte) error {
	if err := b.file(p, data, 0o600, ""); err != nil {
		return err
	}
	c, _ := clean(p)
	b.entries[c].secret = true
	return nil
}

// Remove drops an entry (fault injection: a file the archive should carry).
func (b *Builder) Remove(p string) {
	if c, err := clean(p); err == nil {
		delete(b.entries, c)
	}
}

// Copy adds the host file src at p, keeping its permission bits.
func (b *Builder) Copy(p, src string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("archive: %w", err)
	}
	fi, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("archive: %w", err)
	}
	return b.file(p, data, fi.Mode(), src)
}

// Symlink adds a symbolic link.
func (b *Builder) Symlink(p, target string) error {
	c, err := clean(p)
	if err != nil {
		return err
	}
	b.parents(c)
	b.entries[c] = &entry{mode: sIFLNK | 0o777, data: []byte(target)}
	return nil
}

// CharDev adds a character device node; /dev/console must exist in an
// initramfs for the kernel to give init a console.
func (b *Builder) CharDev(p string, perm os.FileMode, major, minor uint32) error {
	c, err := clean(p)
	if err != nil {
		return err
	}
	b.parents(c)
	b.entries[c] = &entry{mode: sIFCHR | uint32(perm.Perm()), rdev: [2]uint32{major, minor}}
	return nil
}

// Manifest lists the regular files added so far.
func (b *Builder) Manifest() Manifest {
	m := Manifest{Kernel: b.Kernel, Compression: b.compression(), Files: []manifest.Entry{}}
	for _, p := range b.sorted() {
		e := b.entries[p]
		if e.mode&0o170000 != sIFREG || p == ManifestPath {
			continue
		}
		sum := sha256.Sum256(e.data)
		// Only a root path is recorded: a host path (the image cache's
		// folder) would make the same files a different archive on every
		// machine and in every clone.
		var source string
		if strings.HasPrefix(e.source, manifest.RootPrefix) {
			source = e.source
		}
		m.Files = append(m.Files, manifest.Entry{Path: "/" + p, Size: int64(len(e.data)), SHA256: hex.EncodeToString(sum[:]),
			Source: source, Editable: e.editable, Secret: e.secret})
	}
	return m
}

func (b *Builder) compression() string {
	if b.Compression == "" {
		return Gzip
	}
	return b.Compression
}

func (b *Builder) sorted() []string {
	names := make([]string, 0, len(b.entries))
	for p := range b.entries {
		names = append(names, p)
	}
	sort.Strings(names)
	return names
}

// WriteCPIO writes the uncompressed newc stream, manifest included.
func (b *Builder) WriteCPIO(w io.Writer) error {
	if err := b.File(ManifestPath, b.Manifest().Marshal(), 0o644); err != nil {
		return err
	}
	cw := &cpioWriter{w: w}
	ino := uint32(1)
	for _, p := range b.sorted() {
		e := b.entries[p]
		if err := cw.entry(p, ino, e.mode, e.rdev, e.data); err != nil {
			return err
		}
		ino++
	}
	return cw.trailer()
}

// WriteGzip writes the gzip-compressed archive. The gzip header carries no
// name and no time, so output depends on the entries alone.
func (b *Builder) WriteGzip(w io.Writer) error {
	zw, err := gzip.NewWriterLevel(w, gzip.BestSpeed)
	if err != nil {
		return err
	}
	if err := b.WriteCPIO(zw); err != nil {
		return err
	}
	return zw.Close()
}

// WriteZstd writes the zstd-compressed archive (one frame, with a content
// checksum the kernel verifies while unpacking).
func (b *Builder) WriteZstd(w io.Writer) error {
	zw, err := zstd.NewWriter(w, zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithEncoderConcurrency(1),
		zstd.WithWindowSize(8<<20), zstd.WithEncoderCRC(true))
	if err != nil {
		return err
	}
	if err := b.WriteCPIO(zw); err != nil {
		zw.Close()
		return err
	}
	return zw.Close()
}

// Encode writes the archive compressed as b.Compression says.
func (b *Builder) Encode(w io.Writer) error {
	switch b.compression() {
	case Gzip:
		return b.WriteGzip(w)
	case Zstd:
		return b.WriteZstd(w)
	}
	return fmt.Errorf("archive: compression %q: want %s or %s", b.Compression, Gzip, Zstd)
}

// WriteFile writes the compressed archive to path atomically: a reader of
// path sees the whole old archive or the whole new one.
func (b *Builder) WriteFile(path string) error {
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*.tmp")
	if err != nil {
		return fmt.Errorf("archive: %w", err)
	}
	tmp := f.Name()
	f.Chmod(0o644)
	if err := b.Encode(f); err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("archive: %w", err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("archive: %w", err)
	}
	return os.Rename(tmp, path)
}

// cpioWriter writes SVR4 "newc" (070701) records.
type cpioWriter struct {
	w   io.Writer
	off int64
}

func (c *cpioWriter) write(b []byte) error {
	n, err := c.w.Write(b)
	c.off += int64(n)
	return err
}

func (c *cpioWriter) pad() error {
	if r := c.off % 4; r != 0 {
		return c.write(make([]byte, 4-r))
	}
	return nil
}

func (c *cpioWriter) entry(name string, ino, mode uint32, rdev [2]uint32, data []byte) error {
	nlink := uint32(1)
	if mode&0o170000 == sIFDIR {
		nlink = 2
	}
	// Fields: magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
	// devminor, rdevmajor, rdevminor, namesize, check. uid, gid and mtime are
	// zero: reproducible, and owned by root in the guest.
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name)+1, 0)
	if err := c.write([]byte(hdr)); err != nil {
		return err
	}
	if err := c.write(append([]byte(name), 0)); err != nil {
		return err
	}
	if err := c.pad(); err != nil {
		return err
	}
	if err := c.write(data); err != nil {
		return err
	}
	return c.pad()
}

func (c *cpioWriter) trailer() error {
	return c.entry("TRAILER!!!", 0, 0, [2]uint32{}, nil)
}
