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
	// Applies reports whether the fault makes sense for a chain.
	Applies func(p qemu.Profile) bool
	apply   func(*plan)
}

// plan is what Boot is about to do; faults edit it.
type plan struct {
	dhcpSilent bool
	noKernel   bool
}

func always(qemu.Profile) bool { return true }

func notDirect(p qemu.Profile) bool { return p.Firmware != qemu.Direct }

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
