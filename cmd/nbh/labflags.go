package main

import (
	"flag"
	"fmt"
	"strings"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/netfab"
	"nbh.dev/nbh/images"
)

// labFlags are the flags nbh boot and nbh serve share: the chain, the root,
// the network and the faults.
type labFlags struct {
	arch, firmware, root, ipsec, cache *string
	family                             *string
	sanboot                            *bool
	mtu                                *int
	faults                             multiFlag
}

func addLabFlags(fs *flag.FlagSet, firmwareHelp string) *labFlags {
	f := &labFlags{
		arch:     fs.String("arch", "amd64", "guest architecture: amd64 or arm64"),
		firmware: fs.String("firmware", "", firmwareHelp),
		root:     fs.String("root", "none", "root file system: none (the archive only), nfs (the lab's NFS export), iscsi (an ext4 LUN of the lab's target) or sanboot (as --root iscsi --sanboot); with a root the marker is NBH-ROOT-READY"),
		family:   fs.String("ip", "4", "what the guest boots over: 4 (IPv4), 6 (IPv6 only: router advertisements with the M flag, DHCPv6 with option 59 boot file URLs, TFTP, HTTP and the NFS and iSCSI roots over IPv6; chains: "+strings.Join(harness.IPv6Chains(), ", ")+") or dual (both; the loaders use IPv4, the init configures both)"),
		sanboot:  fs.Bool("sanboot", false, "with --root iscsi: the loader boots from the iSCSI disk itself (iPXE sanboot: a GPT disk whose ESP holds the Unified Kernel Image, described to the kernel in the iBFT) instead of fetching kernel and archive; chains: "+strings.Join(harness.SANBootChains(), ", ")),
		ipsec:    fs.String("ipsec", "off", "off: a clear network; required: the root's services (portmapper, NFS, iSCSI) only under ESP, with the guest's keys in the reference archive (DHCP, TFTP and HTTP stay clear for the loaders)"),
		mtu:      fs.Int("mtu", 1500, "the network's path MTU: larger frames are dropped, TFTP blocks and TCP segments (ESP included) are sized to fit"),
		cache:    fs.String("cache", "", "image cache folder (default: $NBH_CACHE, else .cache in the nbh source tree)"),
	}
	fs.Var(&f.faults, "fault", "inject a fault (repeatable): "+strings.Join(harness.FaultNames(), ", "))
	return f
}

// resolve checks the flags and returns the chain, the lab's options and a
// spec with the chain, root and faults filled in. Its errors are usage
// errors, worded as flags.
func (f *labFlags) resolve() (harness.Chain, harness.Options, harness.Spec, error) {
	if *f.firmware == "" {
		*f.firmware = map[string]string{"amd64": "seabios-ipxe", "arm64": "uboot"}[*f.arch]
	}
	prof, err := harness.LookupChain(*f.arch, *f.firmware)
	if err != nil {
		return prof, harness.Options{}, harness.Spec{}, err
	}
	spec := harness.Spec{Arch: *f.arch, Firmware: *f.firmware, Family: *f.family}
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
	opts := harness.Options{Cache: images.Open(*f.cache)}
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
			return prof, opts, spec, fmt.Errorf("fault %s does not apply to %s with --root %s", name, prof.Name(), *f.root)
		}
		if ft.IPsec && opts.IPsec == nil {
			return prof, opts, spec, fmt.Errorf("fault %s needs --ipsec required", name)
		}
		spec.Faults = append(spec.Faults, ft)
	}
	return prof, opts, spec, nil
}
