package harness

import (
	"fmt"
	"strings"

	"nbh.dev/nbh/harness/dhcp"
	"nbh.dev/nbh/harness/qemu"
)

// cmdline is the kernel command line every chain passes.
func (g *Guest) cmdline() string {
	s := "console=" + qemu.Console(g.Profile.Arch) + " panic=-1"
	if g.Profile.Arch == "amd64" {
		s += " edd=off" // the real-mode EDD probe costs ~2 s under TCG
	}
	if !strings.Contains(" "+g.spec.Append, " root=") && !strings.Contains(" "+g.spec.Append, " netroot=") {
		switch g.spec.Root {
		case RootNFS:
			s += fmt.Sprintf(" root=/dev/nfs nfsroot=%s:%s,vers=3,tcp ip=dhcp", g.server(), g.plan.nfsPath)
		case RootISCSI:
			// ip=dhcp is for stock initramfs images (dracut brings the
			// network up only when told); the reference init ignores it.
			s += " root=/dev/sda netroot=" + g.iscsiRoot(true) + " ip=dhcp"
		case RootSANBoot:
			// The target is the iBFT's: iscsi_auto for initramfs-tools
			// with open-iscsi, rd.iscsi.firmware for dracut; the
			// reference init takes either. The root is the disk's
			// second partition.
			s += " root=/dev/sda2 iscsi_auto rd.iscsi.firmware=1"
		}
	}
	if g.spec.Initrd == "" {
		// The reference archive's init asks the boot server for files its archive
		// lacks, and stops on a stale archive unless told to warn.
		s += fmt.Sprintf(" nbh.files=http://%s/%s/files", g.server(), g.Name)
		if g.plan.warn || g.spec.OnStale == "warn" {
			s += " nbh.archive=warn"
		}
	}
	if g.spec.Family != "" && g.spec.Family != dhcp.V4 {
		// The reference init's DHCPv6 (and DHCPv4 too for dual).
		s += " nbh.ip=" + g.spec.Family
	}
	if g.spec.Shell {
		s += " nbh.shell=1" // the reference init's and root's shell after the marker
	}
	if g.spec.Append != "" {
		s += " " + g.spec.Append
	}
	return s
}

// skewedKernel names a kernel version the archive's modules are recorded for
// in the module-skew fault: the same release with another ABI number.
func skewedKernel(v string) string {
	if i := strings.Index(v, "-"); i > 0 {
		return v[:i] + "-0-nbh-skew"
	}
	return v + "-nbh-skew"
}

// rootDriver is the module a root cannot be mounted without.
var rootDriver = map[string]string{RootNFS: "nfsv3", RootISCSI: "iscsi_tcp", RootSANBoot: "iscsi_tcp"}
