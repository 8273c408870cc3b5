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
	Image   string // path of vmlinuz
	Modules string // path of lib/modules/VERSION
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
	if k.Image, err = fileIn(dir, arch, pkg, "boot/vmlinuz-"+version); err != nil {
		return nil, err
	}
	if k.Modules, err = fileIn(dir, arch, pkg, "lib/modules/"+version); err != nil {
		return nil, err
	}
	return k, nil
}

// File is one file inside a cached package.
type File struct {
	Package string
	Path    string // inside the package
}

// Files the boot chains use. Architecture-independent packages ("all") are
// fetched through the index of the guest architecture that needs them. The
// NIC's iPXE option ROM is not among them: QEMU patches PCI IDs only into
// its own default ROM (from the host's ipxe-qemu package), and firmware
// rejects an explicit romfile= whose IDs do not match the device.
var (
	Busybox   = File{"busybox-static", "bin/busybox"}
	OVMFCode  = File{"ovmf", "usr/share/OVMF/OVMF_CODE_4M.fd"}
	OVMFVars  = File{"ovmf", "usr/share/OVMF/OVMF_VARS_4M.fd"}
	IPXEEFI   = File{"ipxe", "usr/lib/ipxe/ipxe.efi"}
	AAVMF     = File{"qemu-efi-aarch64", "usr/share/qemu-efi-aarch64/QEMU_EFI.fd"}
	UBoot     = File{"u-boot-qemu", "usr/lib/u-boot/qemu_arm64/u-boot.bin"}
	GRUBArm64 = File{"grub-efi-arm64-bin", "usr/lib/grub/arm64-efi"}
)

// Path fetches f's package for arch and returns the file's path.
func (c *Cache) Path(ctx context.Context, arch string, f File) (string, error) {
	dir, err := c.Package(ctx, arch, f.Package)
	if err != nil {
		return "", err
	}
	return fileIn(dir, arch, f.Package, f.Path)
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
	"amd64": {Busybox, OVMFCode, OVMFVars, IPXEEFI},
	"arm64": {Busybox, AAVMF, UBoot, GRUBArm64},
}

// FetchAll fetches everything guests of arch may boot.
func FetchAll(ctx context.Context, c *Cache, arch string) error {
	files, ok := archFiles[arch]
	if !ok {
		return fmt.Errorf("images: unknown architecture %q (amd64 or arm64)", arch)
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
