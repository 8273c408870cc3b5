package bundle

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/klauspost/compress/zstd"

	"nbh.dev/nbh/internal/rules"
)

// Ext is the packed bundle's file name extension.
const Ext = ".tar.zst"

// Pack writes the bundle folder dir as one .tar.zst file at out: the folder's
// regular files under its base name, for attaching to a bug report.
func Pack(dir, out string) (err error) {
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(out)
		}
	}()
	zw, err := zstd.NewWriter(f)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(zw)
	top := filepath.Base(filepath.Clean(dir))
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if !info.IsDir() && !info.Mode().IsRegular() {
			return nil // sockets, links: not part of a bundle
		}
		h, err := tar.FileInfoHeader(info, "")
		if err != nil {
			return err
		}
		h.Name = filepath.ToSlash(filepath.Join(top, rel))
		if info.IsDir() {
			h.Name += "/"
		}
		h.Uid, h.Gid, h.Uname, h.Gname = 0, 0, "", ""
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if info.IsDir() {
			return nil
		}
		src, err := os.Open(path)
		if err != nil {
			return err
		}
		defer src.Close()
		_, err = io.Copy(tw, src)
		return err
	})
	if err != nil {
		return fmt.Errorf("bundle: pack %s: %w", dir, err)
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return zw.Close()
}

// Bounds on what a packed bundle unpacks to (it is untrusted input): a
// real one holds a kernel, an archive, a console log and a capture, and
// unpacks to at most a few times its size; a bomb unpacks to thousands.
const (
	MaxUnpacked = 4 << 30  // bytes in all
	MaxEntries  = 10000    // files and folders
	MaxRatio    = 200      // unpacked bytes per packed byte, past RatioFloor
	RatioFloor  = 64 << 20 // bytes any bundle may unpack to, whatever its size
	maxWindow   = 32 << 20 // zstd window: Pack's is 8 MiB
)

// ErrTooLarge is a packed bundle past the bounds above.
var ErrTooLarge = errors.New("bundle too large")

// Unpack extracts a packed bundle into a new folder under parent and
// returns the bundle's folder. Only folders and regular files are taken;
// an entry that would land outside the new folder fails the whole unpack,
// and so does unpacking past MaxUnpacked bytes, MaxEntries entries or
// MaxRatio times the packed size (ErrTooLarge): a packed bundle is
// untrusted input, and nothing of it is held in memory.
func Unpack(file, parent string) (string, error) {
	f, err := os.Open(file)
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrBad, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrBad, err)
	}
	budget := min(int64(MaxUnpacked), max(int64(RatioFloor), MaxRatio*fi.Size()))
	if !rules.On(rules.BundleBounds) {
		budget = 1 << 62
	}
	zr, err := zstd.NewReader(f, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
		zstd.WithDecoderMaxWindow(maxWindow), zstd.WithDecoderMaxMemory(uint64(budget)))
	if err != nil {
		return "", fmt.Errorf("%w: %s: %v", ErrBad, file, err)
	}
	defer zr.Close()
	dest, err := os.MkdirTemp(parent, "nbh-bundle-")
	if err != nil {
		return "", err
	}
	root, err := os.OpenRoot(dest)
	if err != nil {
		os.RemoveAll(dest)
		return "", err
	}
	defer root.Close()
	top := ""
	// Every byte that comes out of the decompressor counts, headers and
	// padding too: a tar of countless empty entries is as big a bomb.
	left := &limited{r: zr, n: budget}
	tr := tar.NewReader(left)
	fail := func(err error) (string, error) {
		os.RemoveAll(dest)
		if errors.Is(err, ErrTooLarge) {
			return "", fmt.Errorf("%w: %s: %w", ErrBad, file, err)
		}
		return "", fmt.Errorf("%w: %s: %v", ErrBad, file, err)
	}
	tooLarge := func() (string, error) {
		return fail(fmt.Errorf("%w: it unpacks to more than %d MiB (%d bytes packed; the bound is %d times that, at least %d MiB, at most %d MiB)",
			ErrTooLarge, budget>>20, fi.Size(), MaxRatio, RatioFloor>>20, MaxUnpacked>>20))
	}
	entries := 0
	var written int64 // bytes written to files, which the budget bounds too
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if left.over {
			return tooLarge()
		}
		if err != nil {
			return fail(err)
		}
		if entries++; entries > MaxEntries {
			return fail(fmt.Errorf("%w: more than %d entries", ErrTooLarge, MaxEntries))
		}
		name := filepath.FromSlash(strings.TrimSuffix(h.Name, "/"))
		if !filepath.IsLocal(name) {
			return fail(fmt.Errorf("entry %q leaves the bundle", h.Name))
		}
		first, _, _ := strings.Cut(filepath.ToSlash(name), "/")
		if top == "" {
			top = first
		} else if first != top {
			return fail(fmt.Errorf("entries under %q and %q: a bundle is one folder", top, first))
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := root.MkdirAll(name, 0o755); err != nil {
				return fail(err)
			}
		case tar.TypeReg:
			// A sparse entry's holes come out of the tar reader as zeros
			// no input paid for: refused, as is an entry larger than
			// what is left of the budget.
			for k := range h.PAXRecords {
				if strings.HasPrefix(k, "GNU.sparse") && rules.On(rules.BundleBounds) {
					return fail(fmt.Errorf("entry %q is sparse: a bundle has no sparse files", h.Name))
				}
			}
			if h.Size < 0 || h.Size > budget-written {
				return tooLarge()
			}
			if err := root.MkdirAll(filepath.Dir(name), 0o755); err != nil {
				return fail(err)
			}
			w, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
			if err != nil {
				return fail(err)
			}
			n, err := io.Copy(w, io.LimitReader(tr, h.Size))
			written += n
			if cerr := w.Close(); err == nil {
				err = cerr
			}
			if left.over {
				return tooLarge()
			}
			if err != nil {
				return fail(err)
			}
		default:
			return fail(fmt.Errorf("entry %q is not a file or folder", h.Name))
		}
	}
	if top == "" {
		return fail(errors.New("empty"))
	}
	return filepath.Join(dest, top), nil
}

// Open reads a bundle folder or a packed bundle. A packed one is unpacked
// into a temporary folder that done removes; done is never nil.
func Open(path string) (b *Bundle, v Verdict, done func(), err error) {
	done = func() {}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, v, done, fmt.Errorf("%w: %v", ErrBad, err)
	}
	dir := path
	if !fi.IsDir() {
		if dir, err = Unpack(path, ""); err != nil {
			return nil, v, done, err
		}
		tmp := filepath.Dir(dir)
		done = func() { os.RemoveAll(tmp) }
	}
	b, v, err = Read(dir)
	if err != nil {
		done()
		return nil, v, func() {}, err
	}
	return b, v, done, nil
}

// limited reads r up to n bytes, then fails, noting that it was cut
// (over): a bound, not an end of input.
type limited struct {
	r    io.Reader
	n    int64
	over bool
}

func (l *limited) Read(p []byte) (int, error) {
	if l.n <= 0 {
		l.over = true
		return 0, ErrTooLarge
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	return n, err
}
