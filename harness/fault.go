package harness

import (
	"fmt"
	"sort"
	"strings"

	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/qemu"
)

// Fault is a value: what it changes, where, and the classified outcome a
// boot with it should end in.
type Fault struct {
	Name   string
	Where  string // fabric, service, archive, guest
	Help   string
	Expect failure.Reason
	// Applies reports whether the fault makes sense for a chain and root.
	Applies func(c Chain, root string) bool
	// IPsec faults need a network that requires ESP (Options.IPsec).
	IPsec bool
	apply func(*plan)
}

// plan is what Boot is about to do; faults edit it.
type plan struct {
	dhcpSilent bool
	noKernel   bool
	nfsPath    string // the export path the guest is told to mount
	iqn        string // the iSCSI target the guest is told to log in to
	badCHAP    bool   // the target requires CHAP; the guest has the wrong secret
	noDescribe bool   // the loader SAN-boots without writing the iBFT

	// The reference archive.
	noRefresh     bool // the boot server does not rebuild a stale archive
	editConfig    bool // the root's configuration changes after the build
	skew          bool // the modules are recorded for another kernel
	missingModule bool // the root's driver module is left out
	truncate      bool // the archive download breaks off halfway
	corrupt       bool // one bit of the archive flips in transit
	swap          bool // the archive is rebuilt while it downloads
	warn          bool // the init boots on from a stale archive
	sign          bool // the loader verifies signatures (Spec.Signed)
	tamper        bool // the signed archive changes after signing

	// ESP (an IPsec-required network).
	espNoKeys   bool // the archive carries no keys
	espWrongKey bool // the archive's keys differ from the lab's
	espWrongSPI bool // the archive's SPIs are not the lab's
	espReplay   bool // the guest's ESP packets are replayed
	loaderNFS   bool // the loader reads the boot files from the NFS root
}

func always(Chain, string) bool { return true }

func notDirect(c Chain, _ string) bool { return c.Firmware != qemu.Direct }

// fetched: the loader fetches kernel and archive from the boot server (not
// QEMU, not a SAN disk).
func fetched(c Chain, root string) bool { return notDirect(c, root) && root != RootSANBoot }

func nfsRoot(_ Chain, root string) bool { return root == RootNFS }

func iscsiRoot(_ Chain, root string) bool { return root == RootISCSI }

func sanBoot(_ Chain, root string) bool { return root == RootSANBoot }

// canVerify: the chains whose loader checks signatures of what it loads.
func canVerify(c Chain, _ string) bool { return c.Verifies }

// loaderHasNFS: the chains whose loader can read files over NFS (iPXE,
// U-Boot; not GRUB), with an NFS root to read them from.
func loaderHasNFS(c Chain, root string) bool { return root == RootNFS && c.ReadsNFS }

func anyRoot(_ Chain, root string) bool { return root != RootNone }

func nfsNotDirect(c Chain, root string) bool { return root == RootNFS && notDirect(c, root) }

// Faults are the known faults, by name.
var Faults = map[string]Fault{
	"no-dhcp": {
		Name: "no-dhcp", Where: "service", Expect: failure.NoDHCP, Applies: always,
		Help:  "the DHCP server stays silent towards the guest",
		apply: func(p *plan) { p.dhcpSilent = true },
	},
	"missing-kernel": {
		Name: "missing-kernel", Where: "service", Expect: failure.LoaderFetch, Applies: fetched,
		Help:  "the boot server has no kernel for the guest: the loader's fetch fails",
		apply: func(p *plan) { p.noKernel = true },
	},
	"nfs-wrong-export": {
		Name: "nfs-wrong-export", Where: "guest", Expect: failure.RootMount, Applies: nfsRoot,
		Help:  "the guest is told to mount an export the NFS server does not have",
		apply: func(p *plan) { p.nfsPath = "/nbh/no-such-export" },
	},
	"iscsi-wrong-iqn": {
		Name: "iscsi-wrong-iqn", Where: "guest", Expect: failure.RootMount, Applies: iscsiRoot,
		Help:  "the guest is told to log in to an iSCSI target the server does not have",
		apply: func(p *plan) { p.iqn = "iqn.2026-11.dev.nbh:no-such-target" },
	},
	"stale-config": {
		Name: "stale-config", Where: "archive", Expect: failure.StaleArchive, Applies: nfsRoot,
		Help:  "the root's configuration changes after the archive is built, and the boot server does not rebuild it",
		apply: func(p *plan) { p.editConfig, p.noRefresh = true, true },
	},
	"config-changed": {
		Name: "config-changed", Where: "archive", Expect: failure.None, Applies: nfsRoot,
		Help:  "the root's configuration changes after the archive is built; the boot server rebuilds it before the fetch (the good path: a fresh boot)",
		apply: func(p *plan) { p.editConfig = true },
	},
	"module-skew": {
		Name: "module-skew", Where: "archive", Expect: failure.StaleArchive, Applies: always,
		Help:  "the archive's modules belong to another kernel version than the one booted",
		apply: func(p *plan) { p.skew = true },
	},
	"missing-module": {
		Name: "missing-module", Where: "archive", Expect: failure.MissingModule, Applies: anyRoot,
		Help:  "the driver module the root needs (nfsv3, iscsi_tcp for both iSCSI roots) is not in the archive, nor on the boot server",
		apply: func(p *plan) { p.missingModule = true },
	},
	"truncated-archive": {
		Name: "truncated-archive", Where: "archive", Expect: failure.LoaderFetch, Applies: fetched,
		Help:  "the archive download breaks off halfway (HTTP drops the connection, TFTP sends an error)",
		apply: func(p *plan) { p.truncate = true },
	},
	"corrupt-archive": {
		Name: "corrupt-archive", Where: "archive", Expect: failure.CorruptArchive, Applies: fetched,
		Help:  "one bit of the archive flips in transit; the kernel's unpacker finds it",
		apply: func(p *plan) { p.corrupt = true },
	},
	"archive-swap": {
		Name: "archive-swap", Where: "archive", Expect: failure.None, Applies: nfsNotDirect,
		Help:  "the root changes and the archive is rebuilt while the guest downloads it: the guest still gets the whole old archive, says it is stale and boots on",
		apply: func(p *plan) { p.swap, p.warn = true, true },
	},
	"tampered-archive": {
		Name: "tampered-archive", Where: "archive", Expect: failure.BadSignature, Applies: canVerify,
		Help:  "the loader verifies signatures (as --signed) and the archive changes after the harness signed it",
		apply: func(p *plan) { p.sign, p.tamper = true, true },
	},
	"ipsec-no-keys": {
		Name: "ipsec-no-keys", Where: "archive", Expect: failure.ESPRequired, Applies: anyRoot, IPsec: true,
		Help:  "the archive carries no ESP keys: the init mounts the root in clear, and the network drops it",
		apply: func(p *plan) { p.espNoKeys = true },
	},
	"ipsec-wrong-key": {
		Name: "ipsec-wrong-key", Where: "archive", Expect: failure.ESPAuth, Applies: anyRoot, IPsec: true,
		Help:  "the archive's ESP keys are not the lab's: every ESP packet fails authentication",
		apply: func(p *plan) { p.espWrongKey = true },
	},
	"ipsec-wrong-spi": {
		Name: "ipsec-wrong-spi", Where: "archive", Expect: failure.ESPNoSA, Applies: anyRoot, IPsec: true,
		Help:  "the archive's ESP SPIs are not the lab's: the lab has no SA for the guest's ESP",
		apply: func(p *plan) { p.espWrongSPI = true },
	},
	"esp-replay": {
		Name: "esp-replay", Where: "fabric", Expect: failure.None, Applies: anyRoot, IPsec: true,
		Help:  "every ESP packet the guest sends arrives twice: the replay window drops the copies and the boot goes on",
		apply: func(p *plan) { p.espReplay = true },
	},
	"loader-nfs": {
		Name: "loader-nfs", Where: "loader", Expect: failure.LoaderNoIPsec, Applies: loaderHasNFS, IPsec: true,
		Help:  "the loader is told to read kernel and archive from the NFS root itself (iPXE nfs://, U-Boot's nfs command), which the network protects: no loader can do ESP",
		apply: func(p *plan) { p.loaderNFS = true },
	},
	"san-wrong-iqn": {
		Name: "san-wrong-iqn", Where: "loader", Expect: failure.SANBoot, Applies: sanBoot,
		Help:  "the loader is told to SAN-boot from an iSCSI target the server does not have: its login fails",
		apply: func(p *plan) { p.iqn = "iqn.2026-11.dev.nbh:no-such-target" },
	},
	"san-bad-chap": {
		Name: "san-bad-chap", Where: "loader", Expect: failure.SANBoot, Applies: sanBoot,
		Help:  "the iSCSI target requires CHAP and the loader SAN-boots with the wrong secret",
		apply: func(p *plan) { p.badCHAP = true },
	},
	"san-no-ibft": {
		Name: "san-no-ibft", Where: "loader", Expect: failure.RootMount, Applies: sanBoot,
		Help:  "the loader SAN-boots without describing the disk (sanboot --no-describe): the kernel boots, and its init finds no iBFT to mount the root from",
		apply: func(p *plan) { p.noDescribe = true },
	},
	"iscsi-bad-chap": {
		Name: "iscsi-bad-chap", Where: "guest", Expect: failure.RootMount, Applies: iscsiRoot,
		Help:  "the iSCSI target requires CHAP and the guest answers with the wrong secret",
		apply: func(p *plan) { p.badCHAP = true },
	},
}

// FaultNames lists the known faults, sorted.
func FaultNames() []string {
	var n []string
	for k := range Faults {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

// LookupFault finds a fault by name.
func LookupFault(name string) (Fault, error) {
	f, ok := Faults[name]
	if !ok {
		return Fault{}, fmt.Errorf("unknown fault %q (known: %s)", name, strings.Join(FaultNames(), ", "))
	}
	return f, nil
}
