// Package matrix is the scenario matrix: the rows (chain x root x network x
// fault), how they split into CI shards, and a bounded pool that boots them,
// longest first, each in a lab of its own.
package matrix

import (
	"fmt"
	"slices"
	"sort"
	"strings"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/dhcp"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/harness/timeline"
)

// Row is one boot of the matrix and what it must show.
type Row struct {
	Arch, Firmware string
	Root           string // harness.RootNone, RootNFS, RootISCSI, RootSANBoot
	IPsec          bool   // on a network that requires ESP for the root's services
	Family         string // "" (IPv4), or dhcp.V6 / dhcp.Dual (Spec.Family)
	Fault          string // "" for none
	// SecureBoot is Spec.SecureBoot: "" (the chain's default), "on" or
	// "off".
	SecureBoot string
	// Expect is the fault's expected reason; failure.None means the boot
	// must reach its marker. Stages are where that failure must show
	// (Fault.Stages): the right reason at the wrong stage is not the fault.
	Expect failure.Reason
	Stages []timeline.Stage
	// Rep numbers a row booted again (nbh soak): 0 for the first boot.
	Rep int
}

// Expected says what the row must show: "marker", or the fault's reason
// and the stages it may show at ("no DHCP lease at dhcp").
func (r Row) Expected() string {
	if r.Fault == "" || r.Expect == failure.None {
		return "marker"
	}
	if len(r.Stages) == 0 {
		return string(r.Expect)
	}
	var st []string
	for _, s := range r.Stages {
		st = append(st, s.String())
	}
	return string(r.Expect) + " at " + strings.Join(st, " or ")
}

// Chain is "ARCH/FIRMWARE".
func (r Row) Chain() string { return r.Arch + "/" + r.Firmware }

// RootName is "none", "nfs", "iscsi" or "sanboot".
func (r Row) RootName() string {
	if r.Root == harness.RootNone {
		return "none"
	}
	return r.Root
}

// Network is "clear", "ipsec", or on the clear network over IPv6 only
// "ipv6" or both families "dual".
func (r Row) Network() string {
	switch {
	case r.IPsec:
		return "ipsec"
	case r.Family == dhcp.V6:
		return "ipv6"
	case r.Family == dhcp.Dual:
		return "dual"
	}
	return "clear"
}

// Label is how progress lines and the table name the row.
func (r Row) Label() string {
	s := r.Chain()
	if r.Root != harness.RootNone {
		s += " root=" + r.Root
	}
	if r.IPsec {
		s += " ipsec"
	}
	if r.Family != "" && r.Family != dhcp.V4 {
		s += " ip=" + r.Family
	}
	if r.SecureBoot != "" {
		s += " secure-boot=" + r.SecureBoot
	}
	if r.Fault != "" {
		s += " +" + r.Fault
	}
	if r.Rep > 0 {
		s += fmt.Sprintf(" #%d", r.Rep+1)
	}
	return s
}

// ID is the row's name as a file name: unique within a matrix, stable.
func (r Row) ID() string {
	return strings.NewReplacer("/", "-", " +", "+", " #", "-", " ", "-", "=", "-").Replace(r.Label())
}

// Spec is the boot the row runs.
func (r Row) Spec() harness.Spec {
	s := harness.Spec{Arch: r.Arch, Firmware: r.Firmware, Root: r.Root, Family: r.Family, SecureBoot: r.SecureBoot}
	if c, err := harness.LookupChain(r.Arch, r.Firmware); err == nil && c.Secure != nil && r.Expect == failure.None {
		// A boot of a chain that has Secure Boot passes only if the
		// kernel says Secure Boot is as the row has it.
		if c, err = c.WithSecureBoot(r.SecureBoot); err == nil {
			s.Steps = []string{secureBootLine(c.SecureBoot)}
		}
	}
	if r.Fault != "" {
		f, err := harness.LookupFault(r.Fault)
		if err != nil {
			f = harness.Fault{Name: r.Fault} // Boot says it is unknown
		}
		s.Faults = []harness.Fault{f}
	}
	return s
}

// secureBootLine is what Debian's kernel prints about Secure Boot, on or
// off (its efi_set_secure_boot, on amd64 and arm64 alike).
func secureBootLine(on bool) string {
	if on {
		return `secureboot: Secure boot enabled`
	}
	return `secureboot: Secure boot disabled`
}

func isSecureBootLine(step string) bool {
	return step == secureBootLine(true) || step == secureBootLine(false)
}

// Pass reports whether a verdict is what the row expects: the marker, or a
// failure with the fault's reason.
func (r Row) Pass(v harness.Verdict) bool {
	if r.Fault == "" || r.Expect == failure.None {
		// No fault, or one the lab is expected to absorb (config-changed,
		// archive-swap): the boot must succeed.
		return v.OK
	}
	return !v.OK && v.Reason == r.Expect && (len(r.Stages) == 0 || slices.Contains(r.Stages, v.Stage))
}

// Select narrows what Rows generates.
type Select struct {
	Chains []harness.Chain
	Roots  []string // harness.Roots
	Nets   []bool   // false: clear, true: IPsec required
	Faults bool     // also each applicable fault
	// IPv6 adds, for each chain that can, on the clear network: a boot
	// over IPv6 only (and with Faults, its no-dhcp) and a dual-stack boot,
	// with no root, and each NFS or iSCSI root over IPv6 only.
	IPv6 bool
}

// Rows lists the matrix in a stable order: per network, per chain, per
// root, the clean boot then its faults.
func Rows(sel Select) []Row {
	var rows []Row
	once := map[string]bool{}
	for _, esp := range sel.Nets {
		for _, p := range sel.Chains {
			for _, root := range sel.Roots {
				if esp && root == harness.RootNone {
					continue // nothing is protected before a root
				}
				if !p.Boots(root) || esp && root == harness.RootSANBoot {
					continue // only iPXE SAN-boots, and never under ESP
				}
				rows = append(rows, Row{Arch: p.Arch, Firmware: p.Firmware, Root: root, IPsec: esp})
				if sel.IPv6 && !esp && root == harness.RootNone && p.IPv6 {
					rows = append(rows, Row{Arch: p.Arch, Firmware: p.Firmware, Family: dhcp.V6})
					if sel.Faults {
						f, _ := harness.LookupFault("no-dhcp")
						rows = append(rows, Row{Arch: p.Arch, Firmware: p.Firmware, Family: dhcp.V6, Fault: "no-dhcp", Expect: f.ExpectOn(p), Stages: f.Stages(p)})
					}
					rows = append(rows, Row{Arch: p.Arch, Firmware: p.Firmware, Family: dhcp.Dual})
				}
				if sel.IPv6 && !esp && (root == harness.RootNFS || root == harness.RootISCSI) && p.IPv6 {
					rows = append(rows, Row{Arch: p.Arch, Firmware: p.Firmware, Root: root, Family: dhcp.V6})
				}
				if !sel.Faults {
					continue
				}
				for _, n := range harness.FaultNames() {
					f, _ := harness.LookupFault(n)
					// Faults of the boot path run once, with no root (on
					// the clear network); root faults with their root;
					// IPsec faults on the IPsec network only, once per
					// chain, with the first network root they apply to.
					if f.IPsec != esp || f.Slow || !f.Applies(p, root) {
						continue
					}
					if esp {
						key := p.Name() + " " + n
						if once[key] {
							continue
						}
						once[key] = true
					}
					if esp || root == harness.RootNone || !f.Applies(p, harness.RootNone) {
						rows = append(rows, Row{Arch: p.Arch, Firmware: p.Firmware, Root: root, IPsec: esp, Fault: n, Expect: f.ExpectOn(p), Stages: f.Stages(p)})
					}
				}
			}
			if !esp {
				rows = append(rows, secureBootRows(p, sel.Roots, sel.Faults)...)
			}
		}
	}
	return rows
}

// secureBootRows are a chain's boots with Secure Boot the other way from
// its default, on the clear network: a clean boot with no root (and a SAN
// boot, whose disk's image the firmware then verifies); with faults, each
// fault whose outcome the switch changes or that applies only that way
// (Secure Boot's own, the archive damage a signed image's firmware now
// finds, the unsigned kernel and loader that boot with it off).
func secureBootRows(p harness.Chain, roots []string, faults bool) []Row {
	if p.Secure == nil {
		return nil
	}
	want := harness.SecureBootOn
	if p.SecureBoot {
		want = harness.SecureBootOff
	}
	q, err := p.WithSecureBoot(want)
	if err != nil {
		return nil
	}
	var rows []Row
	if slices.Contains(roots, harness.RootNone) {
		rows = append(rows, Row{Arch: q.Arch, Firmware: q.Firmware, SecureBoot: want})
	}
	if q.SecureBoot && q.SANBoot && slices.Contains(roots, harness.RootSANBoot) {
		rows = append(rows, Row{Arch: q.Arch, Firmware: q.Firmware, Root: harness.RootSANBoot, SecureBoot: want})
	}
	if !faults || !slices.Contains(roots, harness.RootNone) {
		return rows
	}
	for _, n := range harness.FaultNames() {
		f, _ := harness.LookupFault(n)
		if f.IPsec || f.Slow || !f.Applies(q, harness.RootNone) {
			continue
		}
		if f.Applies(p, harness.RootNone) && f.ExpectOn(p) == f.ExpectOn(q) && slices.Equal(f.Stages(p), f.Stages(q)) {
			continue // the same boot as with the chain's default
		}
		rows = append(rows, Row{Arch: q.Arch, Firmware: q.Firmware, SecureBoot: want, Fault: n, Expect: f.ExpectOn(q), Stages: f.Stages(q)})
	}
	return rows
}

// Estimate is a row's expected wall time in seconds under TCG on a 2-core
// machine, one row at a time, from the chains' costs (Chain.Cost, measured
// in full matrix runs): what shards are balanced by and what runs first. It
// depends only on the row, so every shard of a CI run computes the same
// split.
func Estimate(r Row) float64 {
	c, err := harness.LookupChain(r.Arch, r.Firmware)
	if err != nil {
		return 15
	}
	base := c.Cost.Boot
	if r.Root != harness.RootNone {
		base += 1.5
	}
	if r.IPsec {
		base += 1.5
	}
	if r.Family == dhcp.V6 && r.Firmware != qemu.Direct {
		// iPXE waits out DHCPv4 (about 15 s) before it boots over IPv6.
		base += 15
	}
	// Faults that end at the loader end early, by how long the chain takes
	// to get there.
	// (The Secure Boot faults end there only with Secure Boot on.)
	ends := r.Expect != failure.None
	switch r.Fault {
	case "missing-kernel", "loader-nfs":
		base = c.Cost.Loader
	case "unsigned-loader", "dbx-revoked":
		if ends {
			base = c.Cost.Loader
		}
	case "unsigned-kernel":
		if ends {
			base = c.Cost.Loader + 2
		}
	case "truncated-archive":
		base = c.Cost.Loader
		if c.Cost.Truncated > 0 {
			base = c.Cost.Truncated
		}
	case "stalled-transfer":
		// The loader, half the archive, and the stall window.
		base = c.Cost.Loader + harness.DefaultStallWindow.Seconds()
	case "no-dhcp":
		base = c.Cost.NoDHCP
	case "ipsec-wrong-key", "ipsec-wrong-spi", "esp-replay":
		base += 3
	}
	return max(base, 1)
}

// Shard returns the rows of shard i of n (1-based): the rows, longest
// first, each to the shard with the least expected time so far (ties to
// the lowest shard). Every shard computes the same split.
func Shard(rows []Row, i, n int) ([]Row, error) {
	if n < 1 || i < 1 || i > n {
		return nil, fmt.Errorf("shard %d/%d: want 1 <= I <= N", i, n)
	}
	order := LongestFirst(rows)
	load := make([]float64, n)
	var out []Row
	for _, r := range order {
		best := 0
		for s := 1; s < n; s++ {
			if load[s] < load[best] {
				best = s
			}
		}
		load[best] += Estimate(r)
		if best == i-1 {
			out = append(out, r)
		}
	}
	return out, nil
}

// ParseShard reads "I/N".
func ParseShard(s string) (i, n int, err error) {
	if _, err := fmt.Sscanf(s, "%d/%d", &i, &n); err != nil || n < 1 || i < 1 || i > n {
		return 0, 0, fmt.Errorf("--shard %q: want I/N with 1 <= I <= N", s)
	}
	return i, n, nil
}

// LongestFirst orders rows by expected time, longest first (ties by label):
// a pool that starts the long rows first ends closest to together.
func LongestFirst(rows []Row) []Row {
	out := append([]Row(nil), rows...)
	sort.SliceStable(out, func(a, b int) bool {
		ea, eb := Estimate(out[a]), Estimate(out[b])
		if ea != eb {
			return ea > eb
		}
		return out[a].Label() < out[b].Label()
	})
	return out
}

// StackRows keeps the rows a user's stacks can run: those of an arch with a
// stack, where the stack applies to the row's chain, root and fault
// (harness.Stack.Apply).
func StackRows(rows []Row, stacks map[string]harness.Stack) []Row {
	var out []Row
	for _, r := range rows {
		st, ok := stacks[r.Arch]
		if !ok || (r.IPsec && st.Initrd != "") {
			continue // (an archive of the user's carries no ESP keys)
		}
		c, err := harness.LookupChain(r.Arch, r.Firmware)
		if err != nil {
			continue
		}
		spec, serve := r.Spec(), ""
		if st.Apply(c, &spec, &serve) {
			out = append(out, r)
		}
	}
	return out
}
