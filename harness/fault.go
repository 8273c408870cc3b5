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
	Applies func(p qemu.Profile, root string) bool
	apply   func(*plan)
}

// plan is what Boot is about to do; faults edit it.
type plan struct {
	dhcpSilent bool
	noKernel   bool
	nfsPath    string // the export path the guest is told to mount
	iqn        string // the iSCSI target the guest is told to log in to
	badCHAP    bool   // the target requires CHAP; the guest has the wrong secret
}

func always(qemu.Profile, string) bool { return true }

func notDirect(p qemu.Profile, _ string) bool { return p.Firmware != qemu.Direct }

func nfsRoot(_ qemu.Profile, root string) bool { return root == RootNFS }

func iscsiRoot(_ qemu.Profile, root string) bool { return root == RootISCSI }

// Faults are the known faults, by name.
var Faults = map[string]Fault{
	"no-dhcp": {
		Name: "no-dhcp", Where: "service", Expect: failure.NoDHCP, Applies: always,
		Help:  "the DHCP server stays silent towards the guest",
		apply: func(p *plan) { p.dhcpSilent = true },
	},
	"missing-kernel": {
		Name: "missing-kernel", Where: "service", Expect: failure.LoaderFetch, Applies: notDirect,
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
