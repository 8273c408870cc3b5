package harness

import (
	"fmt"
	"slices"
	"sort"
	"strings"

	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/harness/timeline"
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
	// Slow faults take minutes a boot (slow-link): the matrix leaves them
	// out; they run by name (nbh boot --fault, Spec.Faults).
	Slow  bool
	apply func(*plan)
	// at are the stages a boot with the fault fails at (where the failure
	// shows), for a chain; nil for a fault the boot absorbs.
	at func(Chain) []timeline.Stage
	// expect, when set, is Expect for a chain as it boots (Secure Boot on
	// or off changes what some faults end in).
	expect func(Chain) failure.Reason
}

// ExpectOn is the reason a boot of chain c (as WithSecureBoot made it) with
// the fault must end in; failure.None: it must reach its marker.
func (f Fault) ExpectOn(c Chain) failure.Reason {
	if f.expect != nil {
		return f.expect(c)
	}
	return f.Expect
}

// Stages are the stages at which a boot of chain c with the fault must end
// (with its Expect): a failure elsewhere is not the fault's. Empty for a
// fault the boot absorbs.
func (f Fault) Stages(c Chain) []timeline.Stage {
	if f.at == nil {
		return nil
	}
	return f.at(c)
}

// stage is one stage on every chain.
func stage(s ...timeline.Stage) func(Chain) []timeline.Stage {
	return func(Chain) []timeline.Stage { return s }
}

// dhcpStage is where a missing lease shows: the firmware's DHCP, or on a
// chain without one (QEMU loads the kernel) the init's.
func dhcpStage(c Chain) []timeline.Stage {
	if c.Firmware == qemu.Direct {
		return []timeline.Stage{timeline.Init}
	}
	return []timeline.Stage{timeline.DHCP}
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
	slowLink      bool // the link towards the guest is slow
	truncate      bool // the archive download breaks off halfway
	stall         bool // the archive download stops halfway, the connection open
	corrupt       bool // one bit of the archive flips in transit
	swap          bool // the archive is rebuilt while it downloads
	warn          bool // the init boots on from a stale archive
	sign          bool // the loader verifies signatures (Spec.Signed)
	tamper        bool // the signed archive changes after signing

	// Secure Boot.
	unsignedLoader bool // GRUB without its signature, beside shim
	unsignedKernel bool // the kernel without its signature
	dbxRevoked     bool // the image the firmware starts is in dbx

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

// canVerify: the chains whose loader checks signatures of what it loads, or
// whose firmware verifies the image that carries the archive (a signed
// Unified Kernel Image under Secure Boot).
func canVerify(c Chain, _ string) bool { return c.Verifies || c.signsArchive() }

// shimChain: the chains that boot through shim and GRUB (Secure Boot on or
// off: off, nothing is verified and the boot passes).
func shimChain(c Chain, root string) bool {
	return c.Secure != nil && !c.Secure.Signs && fetched(c, root)
}

// dbxApplies: a boot with Secure Boot on, where the image the firmware
// starts stays the one whose hash went into dbx (not a Unified Kernel
// Image the keeper rebuilds when an NFS root drifts).
func dbxApplies(c Chain, root string) bool {
	return c.SecureBoot && fetched(c, root) && !(c.Stub.Path != "" && root == RootNFS)
}

// refusedUnderSecureBoot is a Secure Boot fault's outcome: the loader
// stage's "secure boot violation" with Secure Boot on; with it off nothing
// checks and the boot reaches its marker.
func refusedUnderSecureBoot(c Chain) failure.Reason {
	if c.SecureBoot {
		return failure.SecureBoot
	}
	return failure.None
}

func atLoaderUnderSecureBoot(c Chain) []timeline.Stage {
	if c.SecureBoot {
		return []timeline.Stage{timeline.Loader}
	}
	return nil
}

// loaderHasNFS: the chains whose loader can read files over NFS (iPXE,
// U-Boot; not GRUB), with an NFS root to read them from.
func loaderHasNFS(c Chain, root string) bool { return root == RootNFS && c.ReadsNFS }

func anyRoot(_ Chain, root string) bool { return root != RootNone }

func nfsNotDirect(c Chain, root string) bool { return root == RootNFS && notDirect(c, root) }

// slowLinkRate is the slow-link fault's bandwidth towards the guest, in
// bytes a second.
const slowLinkRate = 320 << 10

// faults are the known faults, by name (LookupFault).
var faults = map[string]Fault{
	"no-dhcp": {
		Name: "no-dhcp", Where: "service", Expect: failure.NoDHCP, Applies: always,
		Help:  "the DHCP server stays silent towards the guest",
		at:    dhcpStage,
		apply: func(p *plan) { p.dhcpSilent = true },
	},
	"missing-kernel": {
		Name: "missing-kernel", Where: "service", Expect: failure.LoaderFetch, Applies: fetched,
		Help:  "the boot server has no kernel for the guest: the loader's fetch fails",
		at:    stage(timeline.Loader),
		apply: func(p *plan) { p.noKernel = true },
	},
	"nfs-wrong-export": {
		Name: "nfs-wrong-export", Where: "guest", Expect: failure.RootMount, Applies: nfsRoot,
		Help:  "the guest is told to mount an export the NFS server does not have",
		at:    stage(timeline.Root),
		apply: func(p *plan) { p.nfsPath = "/nbh/no-such-export" },
	},
	"iscsi-wrong-iqn": {
		Name: "iscsi-wrong-iqn", Where: "guest", Expect: failure.RootMount, Applies: iscsiRoot,
		Help:  "the guest is told to log in to an iSCSI target the server does not have",
		at:    stage(timeline.Root),
		apply: func(p *plan) { p.iqn = "iqn.2026-11.dev.nbh:no-such-target" },
	},
	"stale-config": {
		Name: "stale-config", Where: "archive", Expect: failure.StaleArchive, Applies: nfsRoot,
		Help:  "the root's configuration changes after the archive is built, and the boot server does not rebuild it",
		at:    stage(timeline.Root),
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
		at:    stage(timeline.Init),
		apply: func(p *plan) { p.skew = true },
	},
	"missing-module": {
		Name: "missing-module", Where: "archive", Expect: failure.MissingModule, Applies: anyRoot,
		Help:  "the driver module the root needs (nfsv3, iscsi_tcp for both iSCSI roots) is not in the archive, nor on the boot server",
		at:    stage(timeline.Root),
		apply: func(p *plan) { p.missingModule = true },
	},
	"truncated-archive": {
		Name: "truncated-archive", Where: "archive", Expect: failure.LoaderFetch, Applies: fetched,
		Help:  "the archive download breaks off halfway (HTTP drops the connection, TFTP sends an error)",
		at:    stage(timeline.Loader),
		apply: func(p *plan) { p.truncate = true },
	},
	"stalled-transfer": {
		Name: "stalled-transfer", Where: "archive", Expect: failure.Stalled, Applies: fetched,
		Help:  "the boot server stops sending the archive halfway without closing the transfer: the boot ends as stalled within the stall window (Spec.StallWindow), not at a deadline",
		at:    stage(timeline.Loader),
		apply: func(p *plan) { p.stall = true },
	},
	"slow-link": {
		Name: "slow-link", Where: "fabric", Expect: failure.None, Applies: fetched, Slow: true,
		Help:  fmt.Sprintf("the guest's link carries %d KiB/s towards it: the downloads take several times as long, keep moving, and the boot passes", slowLinkRate>>10),
		apply: func(p *plan) { p.slowLink = true },
	},
	"corrupt-archive": {
		Name: "corrupt-archive", Where: "archive", Expect: failure.CorruptArchive, Applies: fetched,
		Help: "one bit of the archive flips in transit; the kernel's unpacker finds it (in a signed Unified Kernel Image under Secure Boot, the firmware: secure boot violation at the loader)",
		at: func(c Chain) []timeline.Stage {
			if c.signsArchive() {
				return []timeline.Stage{timeline.Loader}
			}
			return []timeline.Stage{timeline.Kernel, timeline.Init}
		},
		expect: func(c Chain) failure.Reason {
			if c.signsArchive() {
				return failure.SecureBoot
			}
			return failure.CorruptArchive
		},
		apply: func(p *plan) { p.corrupt = true },
	},
	"archive-swap": {
		Name: "archive-swap", Where: "archive", Expect: failure.None, Applies: nfsNotDirect,
		Help:  "the root changes and the archive is rebuilt while the guest downloads it: the guest still gets the whole old archive, says it is stale and boots on",
		apply: func(p *plan) { p.swap, p.warn = true, true },
	},
	"tampered-archive": {
		Name: "tampered-archive", Where: "archive", Expect: failure.BadSignature, Applies: canVerify,
		Help: "the archive changes after the harness signed it: GRUB verifies it (aavmf-grub, as --signed), or the firmware the signed Unified Kernel Image that carries it (ovmf-http and aavmf-http with --secure-boot: secure boot violation)",
		at:   stage(timeline.Loader),
		expect: func(c Chain) failure.Reason {
			if c.signsArchive() {
				return failure.SecureBoot
			}
			return failure.BadSignature
		},
		apply: func(p *plan) { p.sign, p.tamper = true, true },
	},
	"unsigned-loader": {
		Name: "unsigned-loader", Where: "loader", Expect: failure.SecureBoot, Applies: shimChain,
		Help:   "GRUB beside shim is not signed for it (Debian's image with its signature taken off, as a rebuilt GRUB): shim refuses it under Secure Boot; with --secure-boot off the boot passes",
		at:     atLoaderUnderSecureBoot,
		expect: refusedUnderSecureBoot,
		apply:  func(p *plan) { p.unsignedLoader = true },
	},
	"unsigned-kernel": {
		Name: "unsigned-kernel", Where: "loader", Expect: failure.SecureBoot, Applies: shimChain,
		Help:   "the kernel is not signed by a key shim trusts (Debian's kernel with its signature taken off, as a self-built one): GRUB, asking shim, refuses it under Secure Boot; with --secure-boot off the same kernel boots",
		at:     atLoaderUnderSecureBoot,
		expect: refusedUnderSecureBoot,
		apply:  func(p *plan) { p.unsignedKernel = true },
	},
	"dbx-revoked": {
		Name: "dbx-revoked", Where: "firmware", Expect: failure.SecureBoot, Applies: dbxApplies,
		Help:  "the hash of the image the firmware starts (shim, or the signed Unified Kernel Image) is in the firmware's dbx, as a revocation update puts it there: the firmware refuses it",
		at:    stage(timeline.Loader),
		apply: func(p *plan) { p.dbxRevoked = true },
	},
	"ipsec-no-keys": {
		Name: "ipsec-no-keys", Where: "archive", Expect: failure.ESPRequired, Applies: anyRoot, IPsec: true,
		Help:  "the archive carries no ESP keys: the init mounts the root in clear, and the network drops it",
		at:    stage(timeline.Root),
		apply: func(p *plan) { p.espNoKeys = true },
	},
	"ipsec-wrong-key": {
		Name: "ipsec-wrong-key", Where: "archive", Expect: failure.ESPAuth, Applies: anyRoot, IPsec: true,
		Help:  "the archive's ESP keys are not the lab's: every ESP packet fails authentication",
		at:    stage(timeline.Root),
		apply: func(p *plan) { p.espWrongKey = true },
	},
	"ipsec-wrong-spi": {
		Name: "ipsec-wrong-spi", Where: "archive", Expect: failure.ESPNoSA, Applies: anyRoot, IPsec: true,
		Help:  "the archive's ESP SPIs are not the lab's: the lab has no SA for the guest's ESP",
		at:    stage(timeline.Root),
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
		at:    stage(timeline.Loader),
		apply: func(p *plan) { p.loaderNFS = true },
	},
	"san-wrong-iqn": {
		Name: "san-wrong-iqn", Where: "loader", Expect: failure.SANBoot, Applies: sanBoot,
		Help:  "the loader is told to SAN-boot from an iSCSI target the server does not have: its login fails",
		at:    stage(timeline.Loader),
		apply: func(p *plan) { p.iqn = "iqn.2026-11.dev.nbh:no-such-target" },
	},
	"san-bad-chap": {
		Name: "san-bad-chap", Where: "loader", Expect: failure.SANBoot, Applies: sanBoot,
		Help:  "the iSCSI target requires CHAP and the loader SAN-boots with the wrong secret",
		at:    stage(timeline.Loader),
		apply: func(p *plan) { p.badCHAP = true },
	},
	"san-no-ibft": {
		Name: "san-no-ibft", Where: "loader", Expect: failure.RootMount, Applies: sanBoot,
		Help:  "the loader SAN-boots without describing the disk (sanboot --no-describe): the kernel boots, and its init finds no iBFT to mount the root from",
		at:    stage(timeline.Root),
		apply: func(p *plan) { p.noDescribe = true },
	},
	"iscsi-bad-chap": {
		Name: "iscsi-bad-chap", Where: "guest", Expect: failure.RootMount, Applies: iscsiRoot,
		Help:  "the iSCSI target requires CHAP and the guest answers with the wrong secret",
		at:    stage(timeline.Root),
		apply: func(p *plan) { p.badCHAP = true },
	},
}

// Outcomes are the reasons a boot with the fault can end in, over every
// chain (Secure Boot on and off) and root it applies to, in table order;
// failure.None for a boot that reaches its marker.
func (f Fault) Outcomes() []failure.Reason {
	var out []failure.Reason
	for _, c := range chainTable {
		variants := []Chain{c}
		if c.Secure != nil {
			other, _ := c.WithSecureBoot(map[bool]string{true: SecureBootOff, false: SecureBootOn}[c.SecureBoot])
			variants = append(variants, other)
		}
		for _, v := range variants {
			for _, root := range Roots() {
				if f.Applies != nil && !f.Applies(v, root) {
					continue
				}
				if r := f.ExpectOn(v); !slices.Contains(out, r) {
					out = append(out, r)
				}
			}
		}
	}
	return out
}

// FaultNames lists the known faults, sorted.
func FaultNames() []string {
	var n []string
	for k := range faults {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

// LookupFault finds a fault by name.
func LookupFault(name string) (Fault, error) {
	f, ok := faults[name]
	if !ok {
		return Fault{}, fmt.Errorf("unknown fault %q (known: %s)", name, strings.Join(FaultNames(), ", "))
	}
	return f, nil
}
