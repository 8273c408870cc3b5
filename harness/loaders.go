package harness

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"nbh.dev/nbh/harness/bootcfg"
	"nbh.dev/nbh/harness/iscsi"
	"nbh.dev/nbh/harness/sandisk"
	"nbh.dev/nbh/harness/uki"
	"nbh.dev/nbh/images"
	"nbh.dev/nbh/internal/fsutil"
)

// What each chain's loader reads, as chainTable names it.

// ipxeLoader writes the iPXE script: kernel and archive over HTTP (NFS for
// loader-nfs, TFTP on QEMU's user-mode network), or a SAN boot.
func ipxeLoader(ctx context.Context, g *Guest, dir string, b bootcfg.Boot, p plan) error {
	if g.spec.Root == RootSANBoot {
		san, err := g.sanbootDisk(ctx, dir, p)
		if err != nil {
			return err
		}
		b.SAN = san
	}
	script, err := g.loaderConfig(ConfigIPXE, bootcfg.IPXEDefault(), b)
	if err != nil {
		return err
	}
	return writeFile(filepath.Join(dir, "boot.ipxe"), script)
}

// loaderConfig renders a loader configuration of kind for b: the user's
// template (Spec.LoaderConfig) when the guest's chain reads that kind, else
// nbh's default.
func (g *Guest) loaderConfig(kind string, def *bootcfg.Template, b bootcfg.Boot) ([]byte, error) {
	t := def
	if g.config != nil && g.chain.LoaderConfig == kind {
		t = g.config
	}
	s, err := t.Execute(b)
	return []byte(s), err
}

// sanBootFile is the removable-media boot file of each arch's ESP: what
// iPXE's sanboot (and UEFI's boot manager) starts from a disk.
var sanBootFile = map[string]string{"amd64": "EFI/BOOT/BOOTX64.EFI", "arm64": "EFI/BOOT/BOOTAA64.EFI"}

// sanStub is each arch's EFI stub for the SAN disk's Unified Kernel Image.
var sanStub = map[string]images.File{"amd64": images.StubX64(), "arm64": images.StubArm64()}

// sanbootDisk installs the guest's Unified Kernel Image (kernel, archive,
// command line) as the boot file of its SAN disk's ESP, as an installer
// would, and returns what iPXE logs in to. The disk's root partition is
// left as the guest left it. A guest ready for any loader has it done once,
// for the first of its iPXE chains.
func (g *Guest) sanbootDisk(ctx context.Context, dir string, p plan) (*bootcfg.SANBoot, error) {
	if g.san != nil {
		return g.san, nil
	}
	files := map[string]string{}
	if !p.noKernel {
		img := filepath.Join(g.private, "sanboot.efi")
		if _, err := g.buildUKI(ctx, sanStub[g.Profile.Arch], filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.img"), img); err != nil {
			return nil, err
		}
		files[sanBootFile[g.Profile.Arch]] = img
	}
	if err := sandisk.WriteESP(g.disk, files); err != nil {
		return nil, err
	}
	san := &bootcfg.SANBoot{
		URI:        fmt.Sprintf("iscsi:%s::%d:0:%s", g.lab.Server(), iscsi.Port, g.plan.iqn),
		Initiator:  "iqn.2026-11.dev.nbh:" + g.Name,
		NoDescribe: p.noDescribe,
	}
	if g.chap != nil {
		san.User, san.Password = g.chap.User, g.chap.Secret
		if p.badCHAP {
			san.Password = "not-" + san.Password
		}
	}
	g.san = san
	return san, nil
}

// ipxeChainload serves an iPXE binary from the image cache at name (what
// the firmware's PXE fetches over TFTP), and then the iPXE script.
func ipxeChainload(bin images.File, name string) func(context.Context, *Guest, string, bootcfg.Boot, plan) error {
	return func(ctx context.Context, g *Guest, dir string, b bootcfg.Boot, p plan) error {
		if err := ipxeLoader(ctx, g, dir, b, p); err != nil {
			return err
		}
		src, err := g.lab.cache.Path(ctx, g.Profile.Arch, bin)
		if err != nil {
			return err
		}
		return place(src, filepath.Join(g.lab.srv, name))
	}
}

// ubootLoader writes the guest's pxelinux config and its U-Boot boot
// script (GUEST/boot.scr.uimg: a branch for the guest when it boots over
// NFS), and the lab's plain one. U-Boot asks for boot.scr.uimg by that
// name whoever it is: Lab.open gives each guest its own, so no guest reads
// another's command line or NFS path.
func ubootLoader(_ context.Context, g *Guest, dir string, b bootcfg.Boot, p plan) error {
	l := g.lab
	mac := strings.ReplaceAll(g.MAC.String(), ":", "-")
	cfg, err := g.loaderConfig(ConfigPXELinux, bootcfg.PXELinuxDefault(), b)
	if err != nil {
		return err
	}
	if err := writeFile(filepath.Join(l.srv, "pxelinux.cfg", "01-"+mac), cfg); err != nil {
		return err
	}
	own := map[string]bootcfg.Boot{}
	if p.loaderNFS {
		own[g.MAC.String()] = b
	}
	if err := fsutil.WriteAtomic(filepath.Join(dir, ubootScriptName), bootcfg.UBootImage("nbh boot script", bootcfg.UBootScript(own))); err != nil {
		return err
	}
	return fsutil.WriteAtomic(filepath.Join(l.srv, ubootScriptName), bootcfg.UBootImage("nbh boot script", bootcfg.UBootScript(nil)))
}

// ubootScriptName is the boot script U-Boot's distro boot asks for.
const ubootScriptName = "boot.scr.uimg"

// grubLoader writes grub.cfg and builds the guest's GRUB netboot image,
// signing what GRUB loads when the boot verifies signatures.
func grubLoader(ctx context.Context, g *Guest, dir string, b bootcfg.Boot, p plan) error {
	l := g.lab
	cfg := filepath.Join(dir, "grub", "grub.cfg")
	text, err := g.loaderConfig(ConfigGRUB, bootcfg.GRUBDefault(), b)
	if err != nil {
		return err
	}
	if err := writeFile(cfg, text); err != nil {
		return err
	}
	var pubkey string
	if p.sign {
		key, err := l.signingKey(ctx)
		if err != nil {
			return err
		}
		pubkey = key.Public
		files := []string{cfg, filepath.Join(dir, "vmlinuz")}
		if g.keeper == nil {
			// The keeper signs the reference archive each time it
			// serves a build; another archive is signed here.
			files = append(files, filepath.Join(dir, "initrd.img"))
		}
		for _, f := range files {
			if _, err := os.Stat(f); err != nil {
				continue // missing-kernel: nothing to sign
			}
			if err := key.Sign(ctx, f); err != nil {
				return err
			}
		}
	}
	mods, err := l.cache.Path(ctx, "arm64", images.GRUBArm64())
	if err != nil {
		return err
	}
	return bootcfg.GRUBImage(ctx, mods, "(tftp)/"+g.Name+"/grub", filepath.Join(dir, "grubnetaa64.efi"), pubkey)
}

// ukiName is a guest's Unified Kernel Image in its folder on the boot
// server: the URL UEFI HTTP boot is given.
const ukiName = "boot.efi"

// ukiLoader builds the guest's Unified Kernel Image from the kernel and
// archive in its folder, unless the keeper builds it (from the reference
// archive, again whenever the archive is rebuilt) or there is no kernel.
func ukiLoader(stub images.File) func(context.Context, *Guest, string, bootcfg.Boot, plan) error {
	return func(ctx context.Context, g *Guest, dir string, _ bootcfg.Boot, p plan) error {
		if p.noKernel || (g.keeper != nil && g.keeper.pack != nil) {
			return nil
		}
		_, err := g.buildUKI(ctx, stub, filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.img"), filepath.Join(dir, ukiName))
		return err
	}
}

// osRelease is the image's .osrel section (systemd-boot lists the image by
// it; the stub does not need it).
const osRelease = "NAME=nbh\nID=nbh\nPRETTY_NAME=\"nbh netboot harness guest\"\n"

// buildUKI writes a Unified Kernel Image to out: the EFI stub with the
// guest's command line, kernel and archive; it returns where the archive
// lies in it.
func (g *Guest) buildUKI(ctx context.Context, stub images.File, kernel, initrd, out string) (uki.Layout, error) {
	path, err := g.lab.cache.Path(ctx, g.Profile.Arch, stub)
	if err != nil {
		return uki.Layout{}, err
	}
	head, err := os.ReadFile(path)
	if err != nil {
		return uki.Layout{}, err
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return uki.Layout{}, err
	}
	at, err := uki.Build(out, head, []uki.Section{
		{Name: ".osrel", Data: []byte(osRelease)},
		{Name: ".cmdline", Data: []byte(g.cmdline())},
		{Name: ".linux", File: kernel},
		{Name: ".initrd", File: initrd},
	})
	if err != nil {
		return uki.Layout{}, err
	}
	return at[".initrd"], nil
}

// ubootEnv writes the guest's U-Boot environment flash: the default
// environment with its MAC address (U-Boot 2023.01 reads a virtio NIC's MAC
// as its first byte six times over, 52:52:52:52:52:52, so DHCP leases and
// pxelinux.cfg/01-MAC would miss) and no autoboot delay.
func ubootEnv(g *Guest, ubootBin string) (string, error) {
	bin, err := os.ReadFile(ubootBin)
	if err != nil {
		return "", err
	}
	env, err := bootcfg.UBootEnv(bin, map[string]string{"ethaddr": g.MAC.String(), "bootdelay": "0"})
	if err != nil {
		return "", err
	}
	path := filepath.Join(g.private, "uboot-env.fd")
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if _, err := f.Write(env); err != nil {
		return "", err
	}
	return path, f.Truncate(bootcfg.UBootFlashSize)
}
