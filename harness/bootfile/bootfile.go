// Package bootfile is how the lab's file servers (TFTP and HTTP) open what
// they serve. Both ask an Opener, so the lab can act at the moment a guest
// fetches a file — rebuild a stale boot archive first, swap it mid-download,
// or damage it in transit — without either server knowing about archives.
package bootfile

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
)

// File is an open file to serve: its bytes through ReaderAt/ReadSeeker, its
// size as the servers announce it (TFTP tsize, HTTP Content-Length).
type File struct {
	*io.SectionReader
	ModTime time.Time
	close   func() error
}

// Close releases the file.
func (f *File) Close() error {
	if f.close == nil {
		return nil
	}
	return f.close()
}

// Opener opens name (slash-separated, relative to the served root) for the
// client at addr.
type Opener func(name, addr string) (*File, error)

// ErrNotRegular is returned for anything but a regular file.
var ErrNotRegular = errors.New("not a regular file")

// Root serves the files of root, confined to it.
func Root(root *os.Root) Opener {
	return func(name, _ string) (*File, error) {
		name = strings.TrimLeft(name, "/")
		if name == "" {
			name = "."
		}
		// Non-blocking: a FIFO in a served tree (a user's --serve or root
		// tree) would block the open, and the transfer with it, forever;
		// the handle's own type is checked below.
		f, err := root.OpenFile(name, os.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return nil, err
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, err
		}
		if !fi.Mode().IsRegular() {
			f.Close()
			return nil, fmt.Errorf("%s: %w", name, ErrNotRegular)
		}
		return &File{SectionReader: io.NewSectionReader(f, 0, fi.Size()), ModTime: fi.ModTime(), close: f.Close}, nil
	}
}

// Wrap serves f's bytes through r (same announced size); closing the result
// closes f.
func Wrap(f *File, r io.ReaderAt) *File {
	return &File{SectionReader: io.NewSectionReader(r, 0, f.Size()), ModTime: f.ModTime, close: f.Close}
}

// ErrCut is what a Truncated reader fails with past its cut.
var ErrCut = errors.New("transfer cut short (truncated-archive fault)")

// Truncated reads like r up to n bytes and then fails with ErrCut, although
// the file is announced whole: the transfer breaks off (HTTP drops the
// connection short of its Content-Length; TFTP sends an ERROR packet).
func Truncated(r io.ReaderAt, n int64) io.ReaderAt { return truncated{r, n} }

type truncated struct {
	r io.ReaderAt
	n int64
}

func (t truncated) ReadAt(b []byte, off int64) (int, error) {
	if off >= t.n {
		return 0, ErrCut
	}
	if off+int64(len(b)) > t.n {
		k, err := t.r.ReadAt(b[:t.n-off], off)
		if err == nil {
			err = ErrCut
		}
		return k, err
	}
	return t.r.ReadAt(b, off)
}

// Stalled reads like r up to n bytes; a read past them waits, sending
// nothing and failing nothing, until ctx ends (then ErrStalled): a server
// that stops mid-file without closing. stalled is called once, when the
// first read waits.
func Stalled(ctx context.Context, r io.ReaderAt, n int64, stalled func()) io.ReaderAt {
	return &stall{ctx: ctx, r: r, n: n, stalled: stalled}
}

// ErrStalled is what a Stalled reader fails with once its context ends.
var ErrStalled = errors.New("transfer stalled (stalled-transfer fault)")

type stall struct {
	ctx     context.Context
	r       io.ReaderAt
	n       int64
	once    sync.Once
	stalled func()
}

func (s *stall) ReadAt(b []byte, off int64) (int, error) {
	if off+int64(len(b)) <= s.n {
		return s.r.ReadAt(b, off)
	}
	// A read that reaches past the stall waits whole: a short read
	// would end a TFTP transfer (a short block is the last).
	s.once.Do(s.stalled)
	<-s.ctx.Done()
	return 0, ErrStalled
}

// BitFlip reads like r with one bit of the byte at off inverted.
func BitFlip(r io.ReaderAt, off int64) io.ReaderAt { return bitFlip{r, off} }

type bitFlip struct {
	r   io.ReaderAt
	off int64
}

func (f bitFlip) ReadAt(b []byte, off int64) (int, error) {
	n, err := f.r.ReadAt(b, off)
	if i := f.off - off; i >= 0 && i < int64(n) {
		b[i] ^= 0x10
	}
	return n, err
}
