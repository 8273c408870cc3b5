// Package uki builds Unified Kernel Images: systemd's EFI stub (Debian's
// systemd-boot-efi, linuxx64.efi.stub / linuxaa64.efi.stub) with the kernel,
// the boot archive, the command line and an os-release added as PE sections
// (.linux, .initrd, .cmdline, .osrel). UEFI firmware boots the result as one
// EFI application: no loader, no second fetch — what UEFI HTTP boot of one
// URL needs.
//
// It is written in Go rather than with objcopy (what ukify does under the
// hood in systemd 252, which has no ukify): binutils is then no host
// dependency, the layout (section addresses) is chosen here, not by
// objcopy's defaults, and the file offset of the archive is known, which the
// boot server's archive faults need to damage the archive and not the kernel.
package uki

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Section is one PE section added to the stub.
type Section struct {
	Name string // at most 8 bytes, e.g. ".linux"
	Data []byte // the contents, or
	File string // a file holding them
}

// Layout says where an added section's contents lie in the built file.
type Layout struct {
	Offset, Size int64
}

const (
	peMagic32Plus = 0x20b
	sectionHeader = 40
	// Characteristics of the added sections: initialized data, readable.
	dataReadable = 0x40000040
)

// Build writes the stub with sections appended to out (through a temporary
// file renamed into place, so a reader sees the whole old or the whole new
// image) and returns each added section's place in it, by name.
func Build(out string, stub []byte, sections []Section) (map[string]Layout, error) {
	h, err := parse(stub)
	if err != nil {
		return nil, err
	}
	room := h.firstRaw - (h.secTable + sectionHeader*h.nsec)
	if need := sectionHeader * int64(len(sections)); need > room {
		return nil, fmt.Errorf("uki: the stub has room for %d more section headers, not %d", room/sectionHeader, len(sections))
	}
	sizes := make([]int64, len(sections))
	for i, s := range sections {
		if len(s.Name) == 0 || len(s.Name) > 8 {
			return nil, fmt.Errorf("uki: section name %q: 1 to 8 bytes", s.Name)
		}
		sizes[i] = int64(len(s.Data))
		if s.File != "" {
			fi, err := os.Stat(s.File)
			if err != nil {
				return nil, fmt.Errorf("uki: %w", err)
			}
			sizes[i] = fi.Size()
		}
	}

	img := bytes.Clone(stub)
	// The added sections go after the stub's own, in memory and in the
	// file, each aligned as the stub's headers say.
	va := alignUp(max(h.sizeOfImage, h.endVA), h.sectionAlign)
	raw := alignUp(int64(len(img)), h.fileAlign)
	layout := map[string]Layout{}
	le := binary.LittleEndian
	for i, s := range sections {
		if va+sizes[i] > 1<<32 {
			return nil, fmt.Errorf("uki: section %s does not fit a PE image's 4 GiB", s.Name)
		}
		hdr := img[h.secTable+sectionHeader*(h.nsec+int64(i)):][:sectionHeader]
		clear(hdr)
		copy(hdr, s.Name)
		le.PutUint32(hdr[8:], uint32(sizes[i]))                        // VirtualSize
		le.PutUint32(hdr[12:], uint32(va))                             // VirtualAddress
		le.PutUint32(hdr[16:], uint32(alignUp(sizes[i], h.fileAlign))) // SizeOfRawData
		le.PutUint32(hdr[20:], uint32(raw))                            // PointerToRawData
		le.PutUint32(hdr[36:], dataReadable)                           // Characteristics
		layout[s.Name] = Layout{Offset: raw, Size: sizes[i]}
		va = alignUp(va+sizes[i], h.sectionAlign)
		raw += alignUp(sizes[i], h.fileAlign)
	}
	le.PutUint16(img[h.coff+2:], uint16(h.nsec+int64(len(sections)))) // NumberOfSections
	le.PutUint32(img[h.opt+56:], uint32(va))                          // SizeOfImage
	le.PutUint32(img[h.opt+64:], 0)                                   // CheckSum: not used by UEFI

	tmp, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".*")
	if err != nil {
		return nil, fmt.Errorf("uki: %w", err)
	}
	defer os.Remove(tmp.Name())
	err = write(tmp, img, sections, layout, h.fileAlign)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), out)
	}
	if err != nil {
		return nil, fmt.Errorf("uki: %w", err)
	}
	return layout, nil
}

// write lays the image out: the stub with its new headers, then each
// section at its offset (the gaps are zeros).
func write(f *os.File, img []byte, sections []Section, layout map[string]Layout, fileAlign int64) error {
	if _, err := f.Write(img); err != nil {
		return err
	}
	for _, s := range sections {
		at := layout[s.Name]
		var r io.Reader = bytes.NewReader(s.Data)
		if s.File != "" {
			in, err := os.Open(s.File)
			if err != nil {
				return err
			}
			defer in.Close()
			r = in
		}
		w := io.NewOffsetWriter(f, at.Offset)
		if n, err := io.Copy(w, r); err != nil {
			return err
		} else if n != at.Size {
			return fmt.Errorf("%s changed while it was copied (%d bytes, was %d)", s.Name, n, at.Size)
		}
	}
	// Pad the last section to the file alignment, as its SizeOfRawData says.
	end := int64(len(img))
	for _, at := range layout {
		end = max(end, at.Offset+at.Size)
	}
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if fi.Size() < alignUp(end, fileAlign) {
		return f.Truncate(alignUp(end, fileAlign))
	}
	return nil
}

// header is what Build needs of the stub's PE headers.
type header struct {
	coff, opt, secTable int64 // offsets of the COFF header, optional header and section table
	nsec                int64
	sectionAlign        int64
	fileAlign           int64
	sizeOfImage         int64
	endVA               int64 // end of the last section in memory
	firstRaw            int64 // where the first section's data starts in the file
}

// parse reads a PE32+ image's headers, checking what Build relies on.
func parse(b []byte) (header, error) {
	bad := func(why string) (header, error) {
		return header{}, errors.New("uki: the stub is not a PE32+ image: " + why)
	}
	le := binary.LittleEndian
	if len(b) < 0x40 || string(b[:2]) != "MZ" {
		return bad("no MZ header")
	}
	pe := int64(le.Uint32(b[0x3c:]))
	if pe+24 > int64(len(b)) || string(b[pe:pe+4]) != "PE\x00\x00" {
		return bad("no PE signature")
	}
	h := header{coff: pe + 4}
	h.nsec = int64(le.Uint16(b[h.coff+2:]))
	optSize := int64(le.Uint16(b[h.coff+16:]))
	h.opt = h.coff + 20
	h.secTable = h.opt + optSize
	if optSize < 112 || h.secTable+sectionHeader*h.nsec > int64(len(b)) {
		return bad("headers cut short")
	}
	if le.Uint16(b[h.opt:]) != peMagic32Plus {
		return bad("not PE32+")
	}
	h.sectionAlign = int64(le.Uint32(b[h.opt+32:]))
	h.fileAlign = int64(le.Uint32(b[h.opt+36:]))
	h.sizeOfImage = int64(le.Uint32(b[h.opt+56:]))
	if h.sectionAlign == 0 || h.fileAlign == 0 || h.sectionAlign&(h.sectionAlign-1) != 0 || h.fileAlign&(h.fileAlign-1) != 0 {
		return bad("bad alignment")
	}
	h.firstRaw = int64(le.Uint32(b[h.opt+60:])) // SizeOfHeaders
	for i := range h.nsec {
		s := b[h.secTable+sectionHeader*i:]
		vsize, va := int64(le.Uint32(s[8:])), int64(le.Uint32(s[12:]))
		rawSize, raw := int64(le.Uint32(s[16:])), int64(le.Uint32(s[20:]))
		h.endVA = max(h.endVA, va+max(vsize, rawSize))
		if rawSize > 0 {
			h.firstRaw = min(h.firstRaw, raw)
		}
	}
	return h, nil
}

func alignUp(n, a int64) int64 { return (n + a - 1) &^ (a - 1) }
