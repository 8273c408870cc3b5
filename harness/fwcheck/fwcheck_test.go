package fwcheck

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"gotest.tools/v3/assert"
)

// pe64 is the smallest PE32+ image debug/pe reads: a DOS header pointing
// at "PE\0\0", a COFF header with the machine type and an optional header.
func pe64(machine uint16) []byte {
	b := make([]byte, 0x40+4+20+240)
	copy(b, "MZ")
	binary.LittleEndian.PutUint32(b[0x3c:], 0x40)
	copy(b[0x40:], "PE\x00\x00")
	coff := b[0x44:]
	binary.LittleEndian.PutUint16(coff[0:], machine)
	binary.LittleEndian.PutUint16(coff[16:], 240) // SizeOfOptionalHeader
	opt := b[0x44+20:]
	binary.LittleEndian.PutUint16(opt[0:], 0x20b) // PE32+
	binary.LittleEndian.PutUint32(opt[108:], 16)  // NumberOfRvaAndSizes
	return b
}

func write(t *testing.T, name string, b []byte) string {
	p := filepath.Join(t.TempDir(), name)
	assert.NilError(t, os.WriteFile(p, b, 0o644))
	return p
}

func TestEFIBinaryMachine(t *testing.T) {
	// The PE machine numbers from the PE/COFF specification.
	x64, aa64 := write(t, "x64.efi", pe64(0x8664)), write(t, "aa64.efi", pe64(0xaa64))
	assert.NilError(t, EFIBinary("loader", x64, "amd64"))
	assert.NilError(t, EFIBinary("loader", aa64, "arm64"))
	assert.ErrorContains(t, EFIBinary("loader", aa64, "amd64"), "an EFI binary for arm64; amd64 guests need one for x86-64")
	assert.ErrorContains(t, EFIBinary("loader", x64, "arm64"), "an EFI binary for x86-64")
	assert.ErrorContains(t, EFIBinary("loader", write(t, "script.ipxe", []byte("#!ipxe\n")), "amd64"), "not an EFI (PE/COFF) binary")
	assert.ErrorContains(t, EFIBinary("loader", write(t, "empty", nil), "amd64"), "empty file")
	assert.ErrorContains(t, EFIBinary("loader", t.TempDir(), "amd64"), "not a regular file")
	assert.ErrorContains(t, EFIBinary("loader", "/nonexistent/x.efi", "amd64"), "no such file")
}

func TestFirmwareImages(t *testing.T) {
	fv := make([]byte, 8192)
	copy(fv[40:], "_FVH")
	code := write(t, "CODE.fd", fv)
	assert.NilError(t, FirmwareCode("firmware code", code, 1<<20))
	assert.ErrorContains(t, FirmwareCode("firmware code", code, 4096), "more than the 4096 the machine's flash holds")
	assert.ErrorContains(t, FirmwareCode("firmware code", write(t, "passwd", []byte("root:x:0:0:root:/root:/bin/bash\n"+string(make([]byte, 64)))), 1<<20), "not a UEFI firmware image")
	// Variables: a firmware volume, or blank as Debian's AAVMF_VARS.fd is.
	assert.NilError(t, FirmwareVars("firmware vars", code, 1<<20))
	assert.NilError(t, FirmwareVars("firmware vars", write(t, "blank.fd", make([]byte, 8192)), 1<<20))
	assert.ErrorContains(t, FirmwareVars("firmware vars", write(t, "junk.fd", []byte("junk")), 1<<20), "not a UEFI variable store")
	rom := make([]byte, 512)
	rom[0], rom[1] = 0x55, 0xaa
	assert.NilError(t, OptionROM("nic rom", write(t, "x.rom", rom)))
	assert.ErrorContains(t, OptionROM("nic rom", code), "not a PCI option ROM")
	assert.NilError(t, Flash("bios", write(t, "bios.bin", rom), 1<<20))
	assert.ErrorContains(t, Flash("bios", write(t, "big.bin", make([]byte, 2048)), 1024), "more than")
}
