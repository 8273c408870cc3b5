package uki

import (
	"bytes"
	"debug/pe"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"gotest.tools/v3/assert"
)

// stub makes a small PE32+ image like systemd's stub: headers of
// headerSize bytes, a .text section, and the given alignments.
func stub(t *testing.T, headerSize, sectionAlign, fileAlign uint32) []byte {
	t.Helper()
	le := binary.LittleEndian
	b := make([]byte, headerSize+fileAlign)
	copy(b, "MZ")
	le.PutUint32(b[0x3c:], 0x40)
	copy(b[0x40:], "PE\x00\x00")
	coff := 0x44
	le.PutUint16(b[coff:], 0x8664)
	le.PutUint16(b[coff+2:], 1)    // one section
	le.PutUint16(b[coff+16:], 240) // optional header size
	opt := coff + 20
	le.PutUint16(b[opt:], 0x20b)
	le.PutUint32(b[opt+32:], sectionAlign)
	le.PutUint32(b[opt+36:], fileAlign)
	le.PutUint32(b[opt+56:], sectionAlign*2) // SizeOfImage
	le.PutUint32(b[opt+60:], headerSize)
	le.PutUint32(b[opt+108:], 16) // NumberOfRvaAndSizes
	sec := opt + 240
	copy(b[sec:], ".text")
	le.PutUint32(b[sec+8:], 16)
	le.PutUint32(b[sec+12:], sectionAlign)
	le.PutUint32(b[sec+16:], fileAlign)
	le.PutUint32(b[sec+20:], headerSize)
	le.PutUint32(b[sec+36:], 0x60000020)
	copy(b[headerSize:], "text section")
	return b
}

func TestBuildAddsSections(t *testing.T) {
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinuz")
	kdata := bytes.Repeat([]byte("K"), 5000)
	assert.NilError(t, os.WriteFile(kernel, kdata, 0o644))
	out := filepath.Join(dir, "boot.efi")
	layout, err := Build(out, stub(t, 0x400, 0x1000, 0x200), []Section{
		{Name: ".cmdline", Data: []byte("console=ttyS0")},
		{Name: ".linux", File: kernel},
		{Name: ".initrd", Data: []byte("archive")},
	})
	assert.NilError(t, err)

	f, err := pe.Open(out)
	assert.NilError(t, err)
	defer f.Close()
	assert.Equal(t, len(f.Sections), 4)
	want := map[string][]byte{".text": nil, ".cmdline": []byte("console=ttyS0"), ".linux": kdata, ".initrd": []byte("archive")}
	var end uint32
	for i, s := range f.Sections {
		assert.Assert(t, s.VirtualAddress%0x1000 == 0, "%s at %#x", s.Name, s.VirtualAddress)
		assert.Assert(t, s.Offset%0x200 == 0, "%s at file offset %#x", s.Name, s.Offset)
		assert.Assert(t, s.VirtualAddress >= end, "%s overlaps the section before", s.Name)
		end = s.VirtualAddress + max(s.VirtualSize, s.Size)
		if i == 0 {
			continue
		}
		data, err := s.Data()
		assert.NilError(t, err)
		assert.DeepEqual(t, data[:s.VirtualSize], want[s.Name])
		assert.Equal(t, layout[s.Name], Layout{Offset: int64(s.Offset), Size: int64(s.VirtualSize)})
	}
	oh := f.OptionalHeader.(*pe.OptionalHeader64)
	assert.Assert(t, oh.SizeOfImage >= end && oh.SizeOfImage%0x1000 == 0, "SizeOfImage %#x, sections end at %#x", oh.SizeOfImage, end)

	// The archive is where the layout says, byte for byte.
	img, err := os.ReadFile(out)
	assert.NilError(t, err)
	at := layout[".initrd"]
	assert.Equal(t, string(img[at.Offset:at.Offset+at.Size]), "archive")
}

func TestBuildRefuses(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "boot.efi")
	_, err := Build(out, []byte("not a PE image, just text that is long enough to have an e_lfanew field.."), nil)
	assert.ErrorContains(t, err, "not a PE32+ image")
	// Headers with room for one more section header, not four.
	small := stub(t, 0x170+40, 0x1000, 0x200)
	_, err = Build(out, small, []Section{{Name: ".a"}, {Name: ".b"}, {Name: ".c"}, {Name: ".d"}})
	assert.ErrorContains(t, err, "room for 1 more section headers, not 4")
	_, err = Build(out, stub(t, 0x400, 0x1000, 0x200), []Section{{Name: ".much-too-long"}})
	assert.ErrorContains(t, err, "1 to 8 bytes")
	_, err = Build(out, stub(t, 0x400, 0x1000, 0x200), []Section{{Name: ".linux", File: filepath.Join(dir, "absent")}})
	assert.ErrorContains(t, err, "no such file")
	_, err = os.Stat(out)
	assert.Assert(t, os.IsNotExist(err), "a refused build leaves no image")
	left, _ := filepath.Glob(filepath.Join(dir, ".boot.efi.*"))
	assert.Equal(t, len(left), 0, "temporary files left: %v", left)
}
