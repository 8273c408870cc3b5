// Package fwcheck checks the user's own firmware, loader and option ROM
// files before QEMU starts: a file that cannot be what its flag says (a
// loader for another architecture, a firmware image that is no UEFI
// firmware volume, a flash file too big for the machine's flash bank) is
// refused with an error naming the file and what it is instead, rather than
// left to a guest that silently never prints.
package fwcheck

import (
	"bytes"
	"debug/pe"
	"fmt"
	"io"
	"os"
)

// peMachine is the PE machine type of each architecture's EFI binaries.
var peMachine = map[string]uint16{"amd64": pe.IMAGE_FILE_MACHINE_AMD64, "arm64": pe.IMAGE_FILE_MACHINE_ARM64, "riscv64": pe.IMAGE_FILE_MACHINE_RISCV64}

var machineName = map[uint16]string{
	pe.IMAGE_FILE_MACHINE_AMD64: "x86-64", pe.IMAGE_FILE_MACHINE_ARM64: "arm64", pe.IMAGE_FILE_MACHINE_I386: "i386",
	pe.IMAGE_FILE_MACHINE_ARMNT: "arm", pe.IMAGE_FILE_MACHINE_RISCV64: "riscv64", pe.IMAGE_FILE_MACHINE_LOONGARCH64: "loongarch64",
}

// regular opens path, which must be a non-empty regular file of at most
// max bytes (0: any size).
func regular(what, path string, max int64) (*os.File, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", what, err)
	}
	fi, err := f.Stat()
	switch {
	case err != nil:
		f.Close()
		return nil, 0, fmt.Errorf("%s %s: %w", what, path, err)
	case !fi.Mode().IsRegular():
		f.Close()
		return nil, 0, fmt.Errorf("%s %s: not a regular file", what, path)
	case fi.Size() == 0:
		f.Close()
		return nil, 0, fmt.Errorf("%s %s: empty file", what, path)
	case max > 0 && fi.Size() > max:
		f.Close()
		return nil, 0, fmt.Errorf("%s %s: %d bytes, more than the %d the machine's flash holds", what, path, fi.Size(), max)
	}
	return f, fi.Size(), nil
}

// EFIBinary checks that path is a PE/COFF EFI application for arch: what a
// UEFI firmware loads as a network boot file (ipxe.efi, a GRUB netboot
// image, shim).
func EFIBinary(what, path, arch string) error {
	f, _, err := regular(what, path, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	p, err := pe.NewFile(f)
	if err != nil {
		return fmt.Errorf("%s %s: not an EFI (PE/COFF) binary: %v", what, path, err)
	}
	defer p.Close()
	want := peMachine[arch]
	if p.Machine != want {
		got := machineName[p.Machine]
		if got == "" {
			got = fmt.Sprintf("machine 0x%04x", p.Machine)
		}
		return fmt.Errorf("%s %s: an EFI binary for %s; %s guests need one for %s (PE machine 0x%04x)", what, path, got, arch, machineName[want], want)
	}
	if p.OptionalHeader == nil {
		return fmt.Errorf("%s %s: a PE object without an optional header, not an EFI application", what, path)
	}
	return nil
}

// fvSignature is a UEFI firmware volume header's signature, at offset 40.
var fvSignature = []byte("_FVH")

// FirmwareCode checks that path is a UEFI firmware image (OVMF, AAVMF):
// it begins with a firmware volume, and fits the machine's flash (max bytes).
func FirmwareCode(what, path string, max int64) error {
	f, _, err := regular(what, path, max)
	if err != nil {
		return err
	}
	defer f.Close()
	head := make([]byte, 64)
	if _, err := io.ReadFull(f, head); err != nil {
		return fmt.Errorf("%s %s: too short for a UEFI firmware image", what, path)
	}
	if !bytes.Equal(head[40:44], fvSignature) {
		return fmt.Errorf("%s %s: not a UEFI firmware image (no firmware volume header, _FVH, at its start)", what, path)
	}
	return nil
}

// FirmwareVars checks that path can be a UEFI variable store: a firmware
// volume, or blank (all zero: some builds, such as Debian's AAVMF_VARS.fd,
// ship it so and the firmware formats it on its first boot), fitting the
// flash.
func FirmwareVars(what, path string, max int64) error {
	f, _, err := regular(what, path, max)
	if err != nil {
		return err
	}
	defer f.Close()
	head := make([]byte, 4096)
	n, _ := io.ReadFull(f, head)
	head = head[:n]
	if n >= 44 && bytes.Equal(head[40:44], fvSignature) {
		return nil
	}
	if n > 0 && bytes.Count(head, []byte{0}) == n {
		return nil
	}
	return fmt.Errorf("%s %s: not a UEFI variable store (neither a firmware volume nor blank)", what, path)
}

// Flash checks a -bios image (SeaBIOS, U-Boot): non-empty and fitting the
// flash.
func Flash(what, path string, max int64) error {
	f, _, err := regular(what, path, max)
	if err != nil {
		return err
	}
	return f.Close()
}

// OptionROM checks that path is a PCI expansion ROM (an iPXE ROM): it
// starts with the 0x55 0xAA signature.
func OptionROM(what, path string) error {
	f, _, err := regular(what, path, 16<<20)
	if err != nil {
		return err
	}
	defer f.Close()
	sig := make([]byte, 2)
	if _, err := io.ReadFull(f, sig); err != nil || sig[0] != 0x55 || sig[1] != 0xAA {
		return fmt.Errorf("%s %s: not a PCI option ROM (no 55 AA signature at its start)", what, path)
	}
	return nil
}
