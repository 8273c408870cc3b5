package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/bootcfg"
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/netfab"
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/harness/secureboot"
	"nbh.dev/nbh/images"
)

// labFlags are the flags nbh boot and nbh serve share: the chain, the root,
// the network and the faults.
type labFlags struct {
	arch, firmware, root, ipsec, cache *string
	family, nic                        *string
	loaderConfig, loader, serve        *string
	fwCode, fwVars, bios, nicROM       *string
	rootDir, rootImage, archiveFiles   *string
	rootWritable                       *bool
	sanboot                            *bool
	mtu                                *int
	faults                             multiFlag
	secureBoot                         secureBootFlag
	dbCerts                            multiFlag
}

// secureBootFlag is --secure-boot: on by itself, or =on, =off; unset, the
// chain's default.
type secureBootFlag string

func (s *secureBootFlag) String() string   { return string(*s) }
func (s *secureBootFlag) IsBoolFlag() bool { return true }
func (s *secureBootFlag) Set(v string) error {
	switch v {
	case "true", "on", "1":
		*s = harness.SecureBootOn
	case "false", "off", "0":
		*s = harness.SecureBootOff
	default:
		return fmt.Errorf("want on or off")
	}
	return nil
}

func addLabFlags(fs *flag.FlagSet, firmwareHelp string) *labFlags {
	f := &labFlags{
		arch:         fs.String("arch", "amd64", "guest architecture: "+strings.Join(images.Arches(), ", ")),
		firmware:     fs.String("firmware", "", firmwareHelp),
		root:         fs.String("root", "none", "root file system: none (the archive only), nfs (the lab's NFS export), iscsi (an ext4 LUN of the lab's target) or sanboot (as --root iscsi --sanboot); with a root the marker is NBH-ROOT-READY"),
		family:       fs.String("ip", "4", "what the guest boots over: 4 (IPv4), 6 (IPv6 only: router advertisements with the M flag, DHCPv6 with option 59 boot file URLs, TFTP, HTTP and the NFS and iSCSI roots over IPv6; chains: "+strings.Join(harness.IPv6Chains(), ", ")+") or dual (both; the loaders use IPv4, the init configures both)"),
		sanboot:      fs.Bool("sanboot", false, "with --root iscsi: the loader boots from the iSCSI disk itself (iPXE sanboot: a GPT disk whose ESP holds the Unified Kernel Image, described to the kernel in the iBFT) instead of fetching kernel and archive; chains: "+strings.Join(harness.SANBootChains(), ", ")),
		ipsec:        fs.String("ipsec", "off", "off: a clear network; required: the root's services (portmapper, NFS, iSCSI) only under ESP, with the guest's keys in the reference archive (DHCP, TFTP and HTTP stay clear for the loaders)"),
		nic:          fs.String("nic", "virtio", "the guest's network card model: "+strings.Join(qemu.NICNames(), ", ")+" (the reference archive carries each one's Linux driver and loads the one the machine has); the firmware must drive it: any model on seabios-ipxe (the pinned iPXE ROM QEMU loads for it) and on direct boots, those whose ROM (as QEMU reports it) has an EFI driver on ovmf-ipxe (i82559er's has none on QEMU 7.2 and 10), e1000 also on uboot; a card the kernel has no driver for is refused"),
		rootDir:      fs.String("root-dir", "", "your own root tree (a folder: mmdebstrap, debootstrap, a build system's output) for --root nfs (each guest gets its own copy) or --root iscsi (an ext4 image of it, made with mke2fs -d and cached by the tree's content); owners, modes, setuid bits, symlinks, hard links and device nodes come through as the tree has them (as root; see README for other users)"),
		rootImage:    fs.String("root-image", "", "your own raw disk or file-system image for --root iscsi, served as the LUN (each guest gets its own sparse copy)"),
		archiveFiles: fs.String("archive-files", "", "with --root nfs --root-dir and the reference archive: a file list (as nbh archive build takes) of your root's files the archive carries, with your root kernel's modules when --kernel is yours; the boot server keeps the archive current when they change on the guest's root"),
		rootWritable: fs.Bool("root-writable", false, "serve --root-dir (NFS) or --root-image itself instead of a copy: the guest's writes land in your files"),
		loaderConfig: fs.String("loader-config", "", "your own configuration for the chain's loader, a Go text/template (the iPXE script for the iPXE chains, the pxelinux config for uboot, grub.cfg for aavmf-grub); its fields are bootcfg.Boot's: {{.Server}} {{.Guest}} {{.MAC}} {{.IP}} {{.Arch}} {{.Firmware}} {{.Kernel}} {{.Initrd}} {{.KernelURL}} {{.InitrdURL}} {{.Cmdline}} {{.Root}} {{.RootPath}} {{.SAN}}; see README"),
		loader:       fs.String("loader", "", "your own boot file for the firmware's PXE, served in place of nbh's (ipxe.efi on ovmf-pxe, ipxe-arm64.efi on aavmf-ipxe, the GRUB image on aavmf-grub): an EFI binary for the guest's architecture"),
		fwCode:       fs.String("firmware-code", "", "your own UEFI firmware build (OVMF or AAVMF code) for the UEFI chains"),
		fwVars:       fs.String("firmware-vars", "", "your own UEFI variable store (copied per guest) for the chains that run their firmware from flash (ovmf-*, aavmf-http)"),
		bios:         fs.String("bios", "", "your own SeaBIOS (seabios-ipxe), U-Boot (arm64 uboot) or OpenSBI (riscv64 uboot: Debian 13's U-Boot stays what it starts) build"),
		nicROM:       fs.String("nic-rom", "", "your own option ROM for the NIC (an iPXE build), loaded on any chain"),
		serve:        fs.String("serve", "", "a folder merged read-only into what TFTP and HTTP serve (menus, second-stage loaders, a netboot tree); a guest's own files come first, and a name in a guest's folder (GUEST/PATH) is also looked up as PATH"),
		mtu:          fs.Int("mtu", 1500, "the network's path MTU: larger frames are dropped, TFTP blocks and TCP segments (ESP included) are sized to fit"),
		cache:        fs.String("cache", os.Getenv("NBH_CACHE"), "image cache folder (default: $NBH_CACHE, else .cache in the nbh source tree)"),
	}
	fs.Var(&f.faults, "fault", "inject a fault (repeatable): "+strings.Join(harness.FaultNames(), ", "))
	fs.Var(&f.secureBoot, "secure-boot", "UEFI Secure Boot: --secure-boot (on) or --secure-boot=off; default on for "+strings.Join(secureByDefault(), " and ")+", off for the others; where the firmware starts what the lab serves (the Unified Kernel Image of ovmf-http and aavmf-http, iPXE and the kernel on ovmf-pxe and aavmf-ipxe, a SAN disk's image) the lab signs it with a key of its own and enrolls its certificate in the firmware's db (chains: "+strings.Join(harness.SecureBootChains(), ", ")+")")
	fs.Var(&f.dbCerts, "db-cert", "with Secure Boot on: a certificate (PEM or DER file; repeatable) added to the firmware's db, for a loader or image of yours signed with your own key")
	return f
}

// secureByDefault names the chains that boot with Secure Boot unless told
// otherwise.
func secureByDefault() []string {
	var out []string
	for _, c := range harness.AllChains() {
		if c.Secure != nil && c.Secure.Default {
			out = append(out, c.Firmware)
		}
	}
	return out
}

// resolve checks the flags and returns the chain, the lab's options and a
// spec with the chain, root and faults filled in. Its errors are usage
// errors, worded as flags.
func (f *labFlags) resolve() (harness.Chain, harness.Options, harness.Spec, error) {
	if *f.firmware == "" {
		*f.firmware = map[string]string{"amd64": "seabios-ipxe", "arm64": "uboot", "riscv64": "uboot"}[*f.arch]
	}
	prof, err := harness.LookupChain(*f.arch, *f.firmware)
	if err != nil {
		return prof, harness.Options{}, harness.Spec{}, err
	}
	if prof, err = prof.WithSecureBoot(string(f.secureBoot)); err != nil {
		return prof, harness.Options{}, harness.Spec{}, fmt.Errorf("--%v", err)
	}
	spec := harness.Spec{Arch: *f.arch, Firmware: *f.firmware, Family: *f.family, NIC: *f.nic,
		RootDir: *f.rootDir, RootImage: *f.rootImage, RootWritable: *f.rootWritable,
		LoaderConfig: *f.loaderConfig, Loader: *f.loader, FirmwareCode: *f.fwCode, FirmwareVars: *f.fwVars, BIOS: *f.bios, NICROM: *f.nicROM,
		SecureBoot: string(f.secureBoot), SecureBootCerts: f.dbCerts}
	if len(f.dbCerts) > 0 && !prof.SecureBoot {
		return prof, harness.Options{}, spec, fmt.Errorf("--db-cert: Secure Boot is off on %s (--secure-boot turns it on)", prof.Name())
	}
	for _, c := range f.dbCerts {
		if _, err := secureboot.ReadCerts(c); err != nil {
			return prof, harness.Options{}, spec, fmt.Errorf("--db-cert: %v", err)
		}
	}
	switch *f.root {
	case "none":
	case harness.RootNFS, harness.RootISCSI, harness.RootSANBoot:
		spec.Root = *f.root
	default:
		return prof, harness.Options{}, spec, fmt.Errorf("--root %q: want none, nfs, iscsi or sanboot", *f.root)
	}
	if *f.sanboot {
		if spec.Root != harness.RootISCSI && spec.Root != harness.RootSANBoot {
			return prof, harness.Options{}, spec, fmt.Errorf("--sanboot boots from an iSCSI disk: it needs --root iscsi")
		}
		spec.Root = harness.RootSANBoot
	}
	if !prof.Boots(spec.Root) {
		return prof, harness.Options{}, spec, fmt.Errorf("--sanboot: %s's loader cannot SAN-boot; use --firmware %s", prof.Name(), strings.Join(harness.SANBootChains(), " or "))
	}
	if err := prof.Drives(spec.NIC, spec.BringsNICDriver()); err != nil {
		return prof, harness.Options{}, spec, fmt.Errorf("--nic: %v", err)
	}
	// The user's own files, checked before anything starts: a template
	// that does not parse or execute, a loader for another architecture,
	// a firmware image that is none.
	if spec.LoaderConfig != "" {
		if prof.LoaderConfig == "" {
			return prof, harness.Options{}, spec, fmt.Errorf("--loader-config: %s has no loader that reads a configuration of nbh's making; its kernel command line is --append", prof.Name())
		}
		if _, err := bootcfg.ReadTemplate(spec.LoaderConfig); err != nil {
			return prof, harness.Options{}, spec, err
		}
	}
	if err := prof.CheckUserFiles(spec); err != nil {
		return prof, harness.Options{}, spec, err
	}
	if *f.archiveFiles != "" {
		b, err := os.ReadFile(*f.archiveFiles)
		if err != nil {
			return prof, harness.Options{}, spec, fmt.Errorf("--archive-files: %v", err)
		}
		spec.ArchiveFromRoot = strings.Split(strings.TrimSpace(string(b)), "\n")
	}
	opts := harness.Options{Cache: images.Open(*f.cache), Accel: os.Getenv("NBH_ACCEL")}
	if *f.serve != "" {
		fi, err := os.Stat(*f.serve)
		if err != nil || !fi.IsDir() {
			return prof, opts, spec, fmt.Errorf("--serve %s: not a folder", *f.serve)
		}
		if opts.Serve, err = filepath.Abs(*f.serve); err != nil {
			return prof, opts, spec, err
		}
	}
	switch *f.ipsec {
	case "off":
	case "required":
		opts.IPsec = ipsec.Required()
	default:
		return prof, opts, spec, fmt.Errorf("--ipsec %q: want off or required", *f.ipsec)
	}
	if err := netfab.CheckMTU(*f.mtu); err != nil {
		return prof, opts, spec, fmt.Errorf("--mtu: %v", err)
	}
	if *f.mtu != 1500 {
		opts.MTU = *f.mtu
	}
	for _, name := range f.faults {
		ft, err := harness.LookupFault(name)
		if err != nil {
			return prof, opts, spec, err
		}
		if ft.Applies != nil && !ft.Applies(prof, spec.Root) {
			sb := ""
			if prof.Secure != nil {
				sb = " and --secure-boot=" + map[bool]string{true: "on", false: "off"}[prof.SecureBoot]
			}
			return prof, opts, spec, fmt.Errorf("fault %s does not apply to %s with --root %s%s (it is: %s)", name, prof.Name(), *f.root, sb, ft.Help)
		}
		if ft.IPsec && opts.IPsec == nil {
			return prof, opts, spec, fmt.Errorf("fault %s needs --ipsec required", name)
		}
		spec.Faults = append(spec.Faults, ft)
	}
	return prof, opts, spec, nil
}
