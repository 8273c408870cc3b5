package archive

import (
	"bufio"
	"bytes"
	"compress/bzip2"
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"strconv"
	"strings"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// Member is one entry of a boot archive someone else built (initramfs-tools,
// dracut, nbh), as Read reports it.
type Member struct {
	Name  string // relative, cleaned: etc/modprobe.d/x.conf
	Mode  uint32 // Unix mode with file type bits
	Size  int64
	Nlink uint32
}

// Regular reports whether the member is a regular file.
func (m Member) Regular() bool { return m.Mode&0o170000 == 0o100000 }

// Limits on what an archive handed to Read can make it do.
const (
	MaxMembers  = 1 << 20   // entries in all segments
	MaxName     = 4096      // bytes of one entry's name
	MaxUnpacked = 4 << 30   // bytes read in all, after decompression (no guest has more memory)
	maxZstdMem  = 256 << 20 // what the zstd decoder may allocate (windows up to 128 MiB: zstd --long=27)
)

// ErrTooBig is an archive past MaxUnpacked or MaxMembers.
var ErrTooBig = errors.New("archive: too big to read")

// ErrCompression is a segment compressed in a way Read does not undo
// (lz4, lzma, lzo; xz, whose decoder allocates whatever dictionary the
// stream's header asks for): the members before it were reported.
var ErrCompression = errors.New("archive: compression not read")

// Read walks a boot archive as the kernel unpacks it: newc cpio segments,
// each uncompressed or compressed (gzip, zstd, bzip2), one after another
// (initramfs-tools and dracut put an uncompressed CPU microcode segment
// before the compressed one), calling fn for each member with its data.
// fn must not keep data past its return. Segments after a compressed one
// other than gzip are not read: the decompressor may have read past its end.
// It stops when ctx ends, and past MaxUnpacked bytes or MaxMembers entries.
func Read(ctx context.Context, r io.Reader, fn func(Member, io.Reader) error) error {
	br := bufio.NewReaderSize(&guarded{ctx: ctx, r: r}, 64<<10)
	n := 0
	for {
		if err := skipZeros(br); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
		magic, _ := br.Peek(6)
		switch {
		case bytes.HasPrefix(magic, []byte("07070")):
			if err := readCPIO(br, &n, fn); err != nil {
				return err
			}
		case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
			zr, err := gzip.NewReader(br)
			if err != nil {
				return fmt.Errorf("archive: gzip: %w", err)
			}
			zr.Multistream(false)
			if err := readAll(&guarded{ctx: ctx, r: zr}, &n, fn); err != nil {
				return err
			}
			// gzip reads no further than its member's end (br is a
			// ByteReader): what follows is the next segment.
		case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
			zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(maxZstdMem), zstd.WithDecoderMaxWindow(128<<20))
			if err != nil {
				return fmt.Errorf("archive: zstd: %w", err)
			}
			defer zr.Close()
			return readAll(&guarded{ctx: ctx, r: zr}, &n, fn)
		case bytes.HasPrefix(magic, []byte{0xfd, '7', 'z', 'X', 'Z', 0}):
			return fmt.Errorf("%w: xz", ErrCompression)
		case bytes.HasPrefix(magic, []byte("BZh")):
			return readAll(&guarded{ctx: ctx, r: bzip2.NewReader(br)}, &n, fn)
		case bytes.HasPrefix(magic, []byte{0x02, 0x21, 0x4c, 0x18}):
			return fmt.Errorf("%w: lz4", ErrCompression)
		case bytes.HasPrefix(magic, []byte{0x89, 'L', 'Z', 'O'}):
			return fmt.Errorf("%w: lzo", ErrCompression)
		case bytes.HasPrefix(magic, []byte{0x5d, 0, 0}):
			return fmt.Errorf("%w: lzma", ErrCompression)
		default:
			return fmt.Errorf("archive: not a boot archive segment (starts % x)", magic)
		}
	}
}

// readAll reads the cpio archives a decompressed segment holds.
func readAll(r io.Reader, n *int, fn func(Member, io.Reader) error) error {
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		if err := skipZeros(br); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
		if err := readCPIO(br, n, fn); err != nil {
			return err
		}
	}
}

// skipZeros skips the zero padding between segments; io.EOF at the end.
func skipZeros(br *bufio.Reader) error {
	for {
		b, err := br.Peek(4096)
		n := 0
		for n < len(b) && b[n] == 0 {
			n++
		}
		br.Discard(n)
		switch {
		case n < len(b):
			return nil // a segment starts
		case err == io.EOF && len(b) == n:
			return io.EOF
		case err != nil && err != io.EOF:
			return fmt.Errorf("archive: %w", err)
		}
	}
}

// guarded reads r until ctx ends or MaxUnpacked bytes have passed: the
// bounds of a decompression bomb.
type guarded struct {
	ctx context.Context
	r   io.Reader
	n   int64
}

func (g *guarded) Read(p []byte) (int, error) {
	if err := g.ctx.Err(); err != nil {
		return 0, err
	}
	if g.n >= MaxUnpacked {
		return 0, fmt.Errorf("%w: more than %d bytes", ErrTooBig, int64(MaxUnpacked))
	}
	if rest := MaxUnpacked - g.n; int64(len(p)) > rest {
		p = p[:rest]
	}
	n, err := g.r.Read(p)
	g.n += int64(n)
	return n, err
}

// readCPIO reads one newc (or crc) cpio archive, up to its trailer.
func readCPIO(br *bufio.Reader, n *int, fn func(Member, io.Reader) error) error {
	var hdr [110]byte
	for {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return fmt.Errorf("archive: cpio header: %w", noEOF(err))
		}
		magic := string(hdr[:6])
		if magic != "070701" && magic != "070702" {
			return fmt.Errorf("archive: cpio header: bad magic %q", magic)
		}
		field := func(i int) (uint32, error) {
			v, err := strconv.ParseUint(string(hdr[6+8*i:14+8*i]), 16, 32)
			return uint32(v), err
		}
		var f [13]uint32
		for i := range f {
			v, err := field(i)
			if err != nil {
				return fmt.Errorf("archive: cpio header field %d: %w", i, err)
			}
			f[i] = v
		}
		mode, nlink, size, namesize := f[1], f[4], int64(f[6]), int(f[11])
		if namesize < 1 || namesize > MaxName {
			return fmt.Errorf("archive: cpio entry name of %d bytes", namesize)
		}
		name := make([]byte, namesize)
		if _, err := io.ReadFull(br, name); err != nil {
			return fmt.Errorf("archive: cpio name: %w", noEOF(err))
		}
		if _, err := br.Discard(pad4(110 + namesize)); err != nil {
			return fmt.Errorf("archive: cpio: %w", noEOF(err))
		}
		nm := string(bytes.TrimRight(name, "\x00"))
		if nm == "TRAILER!!!" {
			return nil
		}
		if *n++; *n > MaxMembers {
			return fmt.Errorf("%w: more than %d entries", ErrTooBig, MaxMembers)
		}
		clean := strings.TrimLeft(path.Clean("/"+nm), "/")
		data := io.LimitReader(br, size)
		if clean != "" {
			if err := fn(Member{Name: clean, Mode: mode, Size: size, Nlink: nlink}, data); err != nil {
				return err
			}
		}
		if _, err := io.Copy(io.Discard, data); err != nil {
			return fmt.Errorf("archive: cpio data of %s: %w", nm, noEOF(err))
		}
		if _, err := br.Discard(pad4(int(size % 4))); err != nil {
			return fmt.Errorf("archive: cpio: %w", noEOF(err))
		}
	}
}

func pad4(n int) int { return (4 - n%4) % 4 }

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
