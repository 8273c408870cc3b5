package secureboot

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
)

// pe is what Authenticode needs of a PE/COFF image's headers.
type pe struct {
	checksum   int64 // offset of the optional header's CheckSum
	certDir    int64 // offset of the Certificate Table's data directory entry
	headerSize int64 // SizeOfHeaders
	sections   [][2]int64
	certOff    int64 // the Certificate Table (attribute certificates), or 0
	certSize   int64
}

// parsePE reads the headers of an EFI image, checking every offset against
// the file (an image is input from the user or the network).
func parsePE(b []byte) (pe, error) {
	var p pe
	le := binary.LittleEndian
	if len(b) < 0x40 || string(b[:2]) != "MZ" {
		return p, errors.New("not a PE image (no MZ header)")
	}
	off := int64(le.Uint32(b[0x3c:]))
	if off < 0 || off+24 > int64(len(b)) || string(b[off:off+4]) != "PE\x00\x00" {
		return p, errors.New("not a PE image (no PE signature)")
	}
	coff := off + 4
	nsec := int64(le.Uint16(b[coff+2:]))
	optSize := int64(le.Uint16(b[coff+16:]))
	opt := coff + 20
	if opt+optSize > int64(len(b)) || optSize < 2 {
		return p, errors.New("PE optional header runs past the file")
	}
	var dirs int64
	switch le.Uint16(b[opt:]) {
	case 0x10b: // PE32
		dirs = opt + 96
	case 0x20b: // PE32+
		dirs = opt + 112
	default:
		return p, fmt.Errorf("unknown PE optional header magic %#x", le.Uint16(b[opt:]))
	}
	if dirs+5*8 > opt+optSize || dirs-4 < opt+64 {
		return p, errors.New("PE image has no Certificate Table entry")
	}
	if int64(le.Uint32(b[dirs-4:])) < 5 { // NumberOfRvaAndSizes
		return p, errors.New("PE image has no Certificate Table entry")
	}
	p.checksum = opt + 64
	p.certDir = dirs + 4*8
	p.headerSize = int64(le.Uint32(b[opt+60:]))
	if p.headerSize > int64(len(b)) || p.headerSize < p.certDir+8 {
		return p, errors.New("PE SizeOfHeaders does not fit the file")
	}
	p.certOff, p.certSize = int64(le.Uint32(b[p.certDir:])), int64(le.Uint32(b[p.certDir+4:]))
	if (p.certOff == 0) != (p.certSize == 0) {
		return p, fmt.Errorf("PE Certificate Table entry has offset %d and size %d", p.certOff, p.certSize)
	}
	if p.certOff != 0 && (p.certOff < p.headerSize || p.certOff+p.certSize != int64(len(b))) {
		// Authenticode requires the table at the very end.
		return p, fmt.Errorf("PE Certificate Table (%d bytes at %d) is not at the end of the %d-byte file", p.certSize, p.certOff, len(b))
	}
	table := opt + optSize
	if table+40*nsec > int64(len(b)) {
		return p, errors.New("PE section table runs past the file")
	}
	end := int64(len(b))
	if p.certOff != 0 {
		end = p.certOff
	}
	for i := int64(0); i < nsec; i++ {
		h := b[table+40*i:]
		size, ptr := int64(le.Uint32(h[16:])), int64(le.Uint32(h[20:]))
		if size == 0 {
			continue
		}
		if ptr+size > end {
			return p, fmt.Errorf("PE section %d runs past the image", i)
		}
		p.sections = append(p.sections, [2]int64{ptr, size})
	}
	sort.Slice(p.sections, func(i, j int) bool { return p.sections[i][0] < p.sections[j][0] })
	return p, nil
}

// Hash is an EFI image's Authenticode SHA-256: what its signature signs
// and what a dbx entry of type EFI_CERT_SHA256 names. It covers the
// headers but the checksum and the Certificate Table entry, each section's
// data in file order, and the rest of the file short of the Certificate
// Table as the specification counts it (PE/COFF specification,
// "Calculating the PE Image Hash"; EDK2's DxeImageVerificationLib hashes
// the same).
func Hash(b []byte) ([sha256.Size]byte, error) {
	p, err := parsePE(b)
	if err != nil {
		return [sha256.Size]byte{}, fmt.Errorf("secureboot: %w", err)
	}
	h := sha256.New()
	h.Write(b[:p.checksum])
	h.Write(b[p.checksum+4 : p.certDir])
	h.Write(b[p.certDir+8 : p.headerSize])
	// The specification counts the bytes hashed (the headers and each
	// section's SizeOfRawData) and hashes the file from that count on, up
	// to the Certificate Table: where sections leave gaps between them,
	// that is not where the last one ends. EDK2 and sbsign count so, and
	// their hash is the one that matters.
	hashed := p.headerSize
	for _, s := range p.sections {
		h.Write(b[s[0] : s[0]+s[1]])
		hashed += s[1]
	}
	if end := int64(len(b)) - p.certSize; hashed < end {
		h.Write(b[hashed:end])
	}
	var out [sha256.Size]byte
	copy(out[:], h.Sum(nil))
	return out, nil
}

// Signed reports whether the image carries a Certificate Table.
func Signed(b []byte) (bool, error) {
	p, err := parsePE(b)
	if err != nil {
		return false, fmt.Errorf("secureboot: %w", err)
	}
	return p.certOff != 0, nil
}

// Strip returns the image without its signatures: the Certificate Table
// cut off and its directory entry cleared. The rest is byte for byte the
// signed image, so its hash is the same.
func Strip(b []byte) ([]byte, error) {
	p, err := parsePE(b)
	if err != nil {
		return nil, fmt.Errorf("secureboot: %w", err)
	}
	if p.certOff == 0 {
		return append([]byte(nil), b...), nil
	}
	out := append([]byte(nil), b[:p.certOff]...)
	clear(out[p.certDir : p.certDir+8])
	return out, nil
}
