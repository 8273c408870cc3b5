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
	"nbh.dev/nbh/harness/secureboot"
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
// the firmware's PXE fetches over TFTP), and then the iPXE script. Under
// Secure Boot the firmware starts only what a key in db signed, iPXE and
// the kernel iPXE hands it alike: the lab signs the guest's own copies of
// both with its key (in its folder, where DHCP then names iPXE). A SAN
// boot's image on the disk is signed as it is built (buildUKI).
func ipxeChainload(bin images.File, name string) func(context.Context, *Guest, string, bootcfg.Boot, plan) error {
	return func(ctx context.Context, g *Guest, dir string, b bootcfg.Boot, p plan) error {
		if err := ipxeLoader(ctx, g, dir, b, p); err != nil {
			return err
		}
		src, err := g.lab.cache.Path(ctx, g.Profile.Arch, bin)
		if err != nil {
			return err
		}
		if !g.chain.signsImage() {
			return place(src, filepath.Join(g.lab.srv, name))
		}
		if g.spec.Loader == "" {
			if err := g.signImage(ctx, src, filepath.Join(dir, name)); err != nil {
				return err
			}
		}
		if kernel := filepath.Join(dir, "vmlinuz"); !p.noKernel && g.spec.Root != RootSANBoot {
			return g.signImage(ctx, kernel, kernel)
		}
		return nil
	}
}

// signImage writes the EFI image src to dst signed by the lab's Secure
// Boot key alone (a signature src carries is taken off first).
func (g *Guest) signImage(ctx context.Context, src, dst string) error {
	tmp, err := os.CreateTemp(g.private, "unsigned-*.efi")
	if err != nil {
		return err
	}
	tmp.Close()
	defer os.Remove(tmp.Name())
	if err := stripSignature(src, tmp.Name()); err != nil {
		return err
	}
	key, err := g.lab.secureBootKey()
	if err != nil {
		return err
	}
	return key.Sign(ctx, tmp.Name(), dst)
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

// ownNames are the names loaders ask for whoever runs them, each with the
// file in the asking guest's folder Lab.open serves by it.
var ownNames = func() map[string]string {
	m := map[string]string{ubootScriptName: ubootScriptName}
	for _, n := range grubCfgNames {
		m[n] = shimGRUBConfig
	}
	return m
}()

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

// shimBoot is what a shim chain serves for an architecture: Debian's
// signed shim and GRUB netboot image, and the names shim and GRUB ask for.
type shimBoot struct {
	shim, grub images.File
	// shimName is shim's name in the guest's folder (what DHCP offers);
	// grubName what shim fetches from the folder it came from.
	shimName, grubName string
	// platform is GRUB's folder for the architecture's modules: the signed
	// image's built-in config reads $prefix/PLATFORM/grub.cfg, else
	// $prefix/grub.cfg (its prefix is /grub on the server it came from).
	platform string
}

var (
	shimX64   = shimBoot{images.ShimX64(), images.GRUBNetX64(), "shimx64.efi", "grubx64.efi", "x86_64-efi"}
	shimArm64 = shimBoot{images.ShimArm64(), images.GRUBNetArm64(), "shimaa64.efi", "grubaa64.efi", "arm64-efi"}
)

// grubCfgNames are the names Debian's signed GRUB netboot image asks for
// its configuration by, whoever runs it: Lab.open gives each guest its own
// GUEST/shim-grub.cfg by them (as U-Boot's script). (Its own name: aavmf-grub's
// GRUB reads GUEST/grub/grub.cfg, signed for --signed.)
var grubCfgNames = []string{"grub/grub.cfg", "grub/" + shimX64.platform + "/grub.cfg", "grub/" + shimArm64.platform + "/grub.cfg"}

const shimGRUBConfig = "shim-grub.cfg"

// shimLoader serves the Secure Boot chain: Debian's shim (signed by
// Microsoft, unless the user brings their own loader), Debian's GRUB
// netboot image beside it (signed by Debian; its signature taken off for
// unsigned-loader), the guest's grub.cfg where that image looks for it,
// and the kernel with its signature taken off for unsigned-kernel. Nothing
// verifies the archive: GRUB asks shim to verify the kernel only.
func shimLoader(sb shimBoot) func(context.Context, *Guest, string, bootcfg.Boot, plan) error {
	return func(ctx context.Context, g *Guest, dir string, b bootcfg.Boot, p plan) error {
		b.TFTP = true
		text, err := g.loaderConfig(ConfigGRUB, bootcfg.GRUBDefault(), b)
		if err != nil {
			return err
		}
		if err := writeFile(filepath.Join(dir, shimGRUBConfig), text); err != nil {
			return err
		}
		arch := g.Profile.Arch
		if g.spec.Loader == "" {
			shim, err := g.lab.cache.Path(ctx, arch, sb.shim)
			if err != nil {
				return err
			}
			if err := place(shim, filepath.Join(dir, sb.shimName)); err != nil {
				return err
			}
		}
		grub, err := g.lab.cache.Path(ctx, arch, sb.grub)
		if err != nil {
			return err
		}
		if p.unsignedLoader {
			err = stripSignature(grub, filepath.Join(dir, sb.grubName))
		} else {
			err = place(grub, filepath.Join(dir, sb.grubName))
		}
		if err != nil {
			return err
		}
		if kernel := filepath.Join(dir, "vmlinuz"); p.unsignedKernel && !p.noKernel {
			return stripSignature(kernel, kernel)
		}
		return nil
	}
}

// stripSignature writes the EFI image src without its signatures to dst
// (a new file: src may be a link into the image cache).
func stripSignature(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	bare, err := secureboot.Strip(b)
	if err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	return fsutil.WriteAtomic(dst, bare)
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
	// Under Secure Boot the image is built in the guest's private folder
	// and signed into place: the served name only ever holds a signed
	// image, whole (each step renames its file into place).
	built := out
	if g.chain.signsImage() {
		tmp, err := os.CreateTemp(g.private, "uki-*.efi")
		if err != nil {
			return uki.Layout{}, err
		}
		tmp.Close()
		defer os.Remove(tmp.Name())
		built = tmp.Name()
	}
	at, err := uki.Build(built, head, []uki.Section{
		{Name: ".osrel", Data: []byte(osRelease)},
		{Name: ".cmdline", Data: []byte(g.cmdline())},
		{Name: ".linux", File: kernel},
		{Name: ".initrd", File: initrd},
	})
	if err != nil {
		return uki.Layout{}, err
	}
	if built != out {
		key, err := g.lab.secureBootKey()
		if err != nil {
			return uki.Layout{}, err
		}
		if err := key.Sign(ctx, built, out); err != nil {
			return uki.Layout{}, err
		}
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
