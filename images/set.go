package images

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

// Kernel is an unpacked Debian kernel package.
type Kernel struct {
	Arch    string
	Version string // uname -r, e.g. 6.1.0-56-amd64
	Image   string // path of vmlinuz (vmlinux on riscv64)
	Modules string // path of lib/modules/VERSION (or usr/lib/modules/VERSION)
}

// Kernel fetches the current Debian kernel for arch.
func (c *Cache) Kernel(ctx context.Context, arch string) (*Kernel, error) {
	pkg, err := c.KernelPackage(ctx, arch)
	if err != nil {
		return nil, err
	}
	dir, err := c.Package(ctx, arch, pkg)
	if err != nil {
		return nil, err
	}
	version := strings.TrimPrefix(pkg, "linux-image-")
	k := &Kernel{Arch: arch, Version: version}
	// Compressed as vmlinuz, or (riscv64) the plain EFI image vmlinux;
	// modules under lib/ or, merged into /usr (Debian 13), usr/lib/.
	if k.Image, err = firstIn(dir, arch, pkg, "boot/vmlinuz-"+version, "boot/vmlinux-"+version); err != nil {
		return nil, err
	}
	if k.Modules, err = firstIn(dir, arch, pkg, "lib/modules/"+version, "usr/lib/modules/"+version); err != nil {
		return nil, err
	}
	return k, nil
}

// firstIn is the first of rels inside the package unpacked at dir; when
// none is there, the error says why the first is not.
func firstIn(dir, arch, pkg string, rels ...string) (string, error) {
	var first error
	for _, rel := range rels {
		p, err := fileIn(dir, arch, pkg, rel)
		if err == nil {
			return p, nil
		}
		if first == nil {
			first = err
		}
	}
	return "", first
}

// File is one file inside a cached package.
type File struct {
	Package string
	Path    string // inside the package
	// Suite, when set, is another Debian release's suite the package
	// comes from (trixie), through the cache's own sources list; else the
	// host's Debian release.
	Suite string
}

// key is the file's package as pins name it: "ipxe", or "ipxe@trixie" for
// another suite's.
func (f File) key() string {
	if f.Suite == "" {
		return f.Package
	}
	return f.Package + "@" + f.Suite
}

// Busybox, OVMFCode, ... are the files the boot chains use (see the
// table below).
func Busybox() File   { return fileBusybox }
func OVMFCode() File  { return fileOVMFCode }
func OVMFVars() File  { return fileOVMFVars }
func IPXEEFI() File   { return fileIPXEEFI }
func AAVMF() File     { return fileAAVMF }
func AAVMFCode() File { return fileAAVMFCode }
func AAVMFVars() File { return fileAAVMFVars }
func UBoot() File     { return fileUBoot }
func GRUBArm64() File { return fileGRUBArm64 }
func StubX64() File   { return fileStubX64 }
func StubArm64() File { return fileStubArm64 }
func IPXEArm64() File { return fileIPXEArm64 }

// Secure Boot: the firmware that enforces it with Microsoft's keys
// enrolled (on amd64 a build that keeps its variables in SMM; AAVMF
// enforces through its variables alone, with the same code), Debian's
// shim signed by Microsoft and GRUB's netboot image signed by Debian.
func OVMFSecureCode() File { return fileOVMFSecureCode }
func OVMFVarsMS() File     { return fileOVMFVarsMS }
func AAVMFVarsMS() File    { return fileAAVMFVarsMS }
func ShimX64() File        { return fileShimX64 }
func ShimArm64() File      { return fileShimArm64 }
func GRUBNetX64() File     { return fileGRUBNetX64 }

// IPXEROMs is the folder of the NICs' iPXE option ROMs (amd64).
func IPXEROMs() File     { return fileIPXEROMs }
func GRUBNetArm64() File { return fileGRUBNetArm64 }

// riscv64 (every package from Debian 13: archSuite): OpenSBI, the
// supervisor-mode U-Boot it jumps to. (Debian 13's EDK2 for riscv64 has no
// network stack: nothing to netboot with; see the README.)
func OpenSBI() File      { return fileOpenSBI }
func UBootRiscv64() File { return fileUBootRiscv64 }

// Files the boot chains use. Architecture-independent packages ("all") are
// fetched through the index of the guest architecture that needs them.
var (
	// The NICs' iPXE option ROMs (a folder of them): a guest's firmware
	// as much as OVMF is, so pinned, not the host's ipxe-qemu (Debian
	// 13's iPXE 1.21.1 EFI ROMs leave the boot to OVMF's own PXE). QEMU
	// finds them as its default ROMs through -L (qemu.Config.ROMDir): it
	// patches PCI IDs only into a default ROM, and firmware rejects an
	// explicit romfile= whose IDs do not match the device.
	fileIPXEROMs = File{Package: "ipxe-qemu", Path: "usr/lib/ipxe/qemu"}

	fileBusybox  = File{Package: "busybox-static", Path: "bin/busybox"}
	fileOVMFCode = File{Package: "ovmf", Path: "usr/share/OVMF/OVMF_CODE_4M.fd"}
	fileOVMFVars = File{Package: "ovmf", Path: "usr/share/OVMF/OVMF_VARS_4M.fd"}
	fileIPXEEFI  = File{Package: "ipxe", Path: "usr/lib/ipxe/ipxe.efi"}
	fileAAVMF    = File{Package: "qemu-efi-aarch64", Path: "usr/share/qemu-efi-aarch64/QEMU_EFI.fd"}
	// The same firmware split into code and (blank) variables flash, for
	// a chain that writes variables before the first boot.
	fileAAVMFCode = File{Package: "qemu-efi-aarch64", Path: "usr/share/AAVMF/AAVMF_CODE.fd"}
	fileAAVMFVars = File{Package: "qemu-efi-aarch64", Path: "usr/share/AAVMF/AAVMF_VARS.fd"}
	fileUBoot     = File{Package: "u-boot-qemu", Path: "usr/lib/u-boot/qemu_arm64/u-boot.bin"}
	fileGRUBArm64 = File{Package: "grub-efi-arm64-bin", Path: "usr/lib/grub/arm64-efi"}
	// systemd's EFI stub, the head of a Unified Kernel Image.
	fileStubX64   = File{Package: "systemd-boot-efi", Path: "usr/lib/systemd/boot/efi/linuxx64.efi.stub"}
	fileStubArm64 = File{Package: "systemd-boot-efi", Path: "usr/lib/systemd/boot/efi/linuxaa64.efi.stub"}
	// Debian 12 has no arm64 iPXE; Debian 13's ipxe (architecture all)
	// ships one.
	fileIPXEArm64 = File{Package: "ipxe", Path: "usr/lib/ipxe/ipxe-arm64.efi", Suite: "trixie"}

	fileOVMFSecureCode = File{Package: "ovmf", Path: "usr/share/OVMF/OVMF_CODE_4M.secboot.fd"}
	fileOVMFVarsMS     = File{Package: "ovmf", Path: "usr/share/OVMF/OVMF_VARS_4M.ms.fd"}
	fileAAVMFVarsMS    = File{Package: "qemu-efi-aarch64", Path: "usr/share/AAVMF/AAVMF_VARS.ms.fd"}
	fileShimX64        = File{Package: "shim-signed", Path: "usr/lib/shim/shimx64.efi.signed"}
	fileShimArm64      = File{Package: "shim-signed", Path: "usr/lib/shim/shimaa64.efi.signed"}
	fileGRUBNetX64     = File{Package: "grub-efi-amd64-signed", Path: "usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"}
	fileGRUBNetArm64   = File{Package: "grub-efi-arm64-signed", Path: "usr/lib/grub/arm64-efi-signed/grubnetaa64.efi.signed"}

	fileOpenSBI      = File{Package: "opensbi", Path: "usr/lib/riscv64-linux-gnu/opensbi/generic/fw_jump.bin"}
	fileUBootRiscv64 = File{Package: "u-boot-qemu", Path: "usr/lib/u-boot/qemu-riscv64_smode/uboot.elf"}
)

// Path fetches f's package for arch and returns the file's path.
func (c *Cache) Path(ctx context.Context, arch string, f File) (string, error) {
	dir, err := c.Package(ctx, arch, f.key())
	if err != nil {
		return "", err
	}
	// Debian 13's packages ship /bin, /lib, /sbin merged into /usr.
	return firstIn(dir, arch, f.key(), f.Path, "usr/"+f.Path)
}

// fileIn is the real path of rel inside the package unpacked at dir (links
// followed inside the package, never on the host).
func fileIn(dir, arch, pkg, rel string) (string, error) {
	p, err := resolveIn(dir, rel)
	if errors.Is(err, errOutside) {
		return "", fmt.Errorf("images: package %s (%s): %w", pkg, arch, err)
	}
	if err != nil {
		return "", fmt.Errorf("images: package %s (%s) has no %s (%v)", pkg, arch, rel, err)
	}
	return p, nil
}

// Chain files by architecture: everything a guest of that architecture may
// need, for FetchAll.
var archFiles = map[string][]File{
	"amd64":   {fileBusybox, fileIPXEROMs, fileOVMFCode, fileOVMFVars, fileIPXEEFI, fileStubX64, fileOVMFSecureCode, fileOVMFVarsMS, fileShimX64, fileGRUBNetX64},
	"riscv64": {fileBusybox, fileOpenSBI, fileUBootRiscv64},
	"arm64":   {fileBusybox, fileAAVMF, fileAAVMFCode, fileAAVMFVars, fileUBoot, fileGRUBArm64, fileStubArm64, fileIPXEArm64, fileAAVMFVarsMS, fileShimArm64, fileGRUBNetArm64},
}

// FetchAll fetches everything guests of arch may boot.
func FetchAll(ctx context.Context, c *Cache, arch string) error {
	files, ok := archFiles[arch]
	if !ok {
		return fmt.Errorf("images: unknown architecture %q (%s)", arch, strings.Join(Arches(), ", "))
	}
	if _, err := c.Kernel(ctx, arch); err != nil {
		return err
	}
	for _, f := range files {
		if _, err := c.Path(ctx, arch, f); err != nil {
			return err
		}
	}
	return nil
}
