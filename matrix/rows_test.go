package matrix

import (
	"slices"
	"strings"
	"testing"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/timeline"
)

func fullRows() []Row {
	return Rows(Select{Chains: harness.AllChains(), Roots: []string{harness.RootNone, harness.RootNFS, harness.RootISCSI}, Nets: []bool{false, true}, Faults: true})
}

func TestRowIDsAreUnique(t *testing.T) {
	rows := fullRows()
	assert.Assert(t, len(rows) > 100, "only %d rows", len(rows))
	seen := map[string]bool{}
	for _, r := range rows {
		assert.Assert(t, !seen[r.ID()], "duplicate row %s", r.ID())
		seen[r.ID()] = true
		assert.Assert(t, Estimate(r) > 0, r.Label())
	}
}

// Shards cover every row exactly once, the same way each time, and no
// shard expects much more time than another.
func TestShardsPartitionAndBalance(t *testing.T) {
	rows := fullRows()
	for _, n := range []int{1, 2, 3, 4, 7} {
		seen := map[string]int{}
		var loads []float64
		for i := 1; i <= n; i++ {
			a, err := Shard(rows, i, n)
			assert.NilError(t, err)
			b, _ := Shard(rows, i, n)
			assert.DeepEqual(t, a, b)
			load := 0.0
			for _, r := range a {
				seen[r.ID()]++
				load += Estimate(r)
			}
			loads = append(loads, load)
		}
		assert.Equal(t, len(seen), len(rows), "n=%d", n)
		for id, c := range seen {
			assert.Equal(t, c, 1, "n=%d: %s in %d shards", n, id, c)
		}
		lo, hi := loads[0], loads[0]
		for _, l := range loads {
			lo, hi = min(lo, l), max(hi, l)
		}
		longest := Estimate(LongestFirst(rows)[0])
		assert.Assert(t, hi-lo <= longest, "n=%d: shard loads %v differ by more than the longest row (%.0fs)", n, loads, longest)
	}
	for _, bad := range []string{"0/4", "5/4", "1/0", "x", "1-4"} {
		_, _, err := ParseShard(bad)
		assert.Assert(t, err != nil, bad)
	}
}

func TestLongestFirst(t *testing.T) {
	rows := LongestFirst(fullRows())
	for i := 1; i < len(rows); i++ {
		assert.Assert(t, Estimate(rows[i-1]) >= Estimate(rows[i]))
	}
}

// TestPassNeedsReasonAndStage: a fault row passes only with the fault's
// reason at one of the fault's stages; the right reason in another stage is
// a failed row (a fault that shows somewhere else is not the fault).
func TestPassNeedsReasonAndStage(t *testing.T) {
	n := 0
	for _, r := range fullRows() {
		if r.Fault == "" || r.Expect == failure.None {
			assert.Assert(t, r.Pass(harness.Verdict{OK: true, Stage: timeline.Marker}), r.Label())
			assert.Assert(t, !r.Pass(harness.Verdict{Reason: failure.Deadline, Stage: timeline.Loader}), r.Label())
			continue
		}
		assert.Assert(t, len(r.Stages) > 0, "%s: no stage to check", r.Label())
		for st := timeline.Firmware; st < timeline.Marker; st++ {
			v := harness.Verdict{Reason: r.Expect, Stage: st}
			assert.Equal(t, r.Pass(v), slices.Contains(r.Stages, st), "%s at %s", r.Label(), st)
			n++
		}
		assert.Assert(t, !r.Pass(harness.Verdict{Reason: failure.Deadline, Stage: r.Stages[0]}), r.Label())
		assert.Assert(t, !r.Pass(harness.Verdict{OK: true, Stage: timeline.Marker}), r.Label())
		assert.Assert(t, strings.Contains(r.Expected(), " at "+r.Stages[0].String()), r.Expected())
	}
	assert.Assert(t, n > 100)

	// The stages real boots of these faults end at (the scenarios'
	// tables, boot_test.go and archive_test.go), not the fault table's
	// own words: a row of them must pass there.
	seen := map[string]timeline.Stage{
		"no-dhcp amd64/seabios-ipxe": timeline.DHCP, "no-dhcp amd64/direct": timeline.Init, "no-dhcp arm64/uboot": timeline.DHCP,
		"no-dhcp arm64/aavmf-grub": timeline.DHCP, "missing-kernel amd64/ovmf-pxe": timeline.Loader,
		"stale-config amd64/seabios-ipxe": timeline.Root, "module-skew arm64/uboot": timeline.Init,
		"truncated-archive amd64/ovmf-http": timeline.Loader, "missing-module arm64/uboot": timeline.Root,
		"stalled-transfer amd64/seabios-ipxe": timeline.Loader, "stalled-transfer arm64/uboot": timeline.Loader,
	}
	checked := 0
	for _, r := range fullRows() {
		if st, ok := seen[r.Fault+" "+r.Chain()]; ok {
			assert.Assert(t, r.Pass(harness.Verdict{Reason: r.Expect, Stage: st}), "%s at %s", r.Label(), st)
			checked++
		}
	}
	assert.Assert(t, checked >= len(seen), "only %d rows checked", checked)
}

// The Secure Boot rows: each chain that has Secure Boot boots it the other
// way from its default too, with the faults whose outcome that changes —
// the signed image's archive damage found by the firmware, the unsigned
// kernel and loader that boot with Secure Boot off — and no row of a fault
// that ends the same either way. A passing row of such a chain needs the
// kernel's line for its Secure Boot state.
func TestSecureBootRows(t *testing.T) {
	got := map[string]string{}
	for _, r := range fullRows() {
		if r.SecureBoot != "" {
			got[r.Label()] = r.Expected()
		}
	}
	want := map[string]string{}
	for _, arch := range []string{"amd64", "arm64"} {
		fw := map[string]string{"amd64": "ovmf", "arm64": "aavmf"}[arch]
		on := arch + "/" + fw + "-http secure-boot=on"
		want[on] = "marker"
		for _, f := range []string{"corrupt-archive", "dbx-revoked", "tampered-archive"} {
			want[on+" +"+f] = "secure boot violation at loader"
		}
		// iPXE and the kernel signed by the lab; the archive beside
		// them is not, so its faults end as without Secure Boot.
		ipxe := arch + "/" + map[string]string{"amd64": "ovmf-pxe", "arm64": "aavmf-ipxe"}[arch] + " secure-boot=on"
		want[ipxe] = "marker"
		want[ipxe+" +dbx-revoked"] = "secure boot violation at loader"
		off := arch + "/" + fw + "-shim secure-boot=off"
		want[off] = "marker"
		for _, f := range []string{"unsigned-kernel", "unsigned-loader"} {
			want[off+" +"+f] = "marker"
		}
	}
	assert.DeepEqual(t, got, want)

	for _, c := range []struct {
		row  Row
		step string
	}{
		{Row{Arch: "amd64", Firmware: "ovmf-shim"}, "secureboot: Secure boot enabled"},
		{Row{Arch: "amd64", Firmware: "ovmf-shim", SecureBoot: "off", Fault: "unsigned-kernel"}, "secureboot: Secure boot disabled"},
		{Row{Arch: "arm64", Firmware: "aavmf-http", SecureBoot: "on"}, "secureboot: Secure boot enabled"},
		{Row{Arch: "arm64", Firmware: "aavmf-http"}, "secureboot: Secure boot disabled"},
	} {
		assert.DeepEqual(t, c.row.Spec().Steps, []string{c.step})
	}
	assert.Equal(t, len(Row{Arch: "amd64", Firmware: "seabios-ipxe"}.Spec().Steps), 0)
	// With a SAN boot the firmware verifies the disk's image too.
	var san []string
	for _, r := range Rows(Select{Chains: harness.AllChains(), Roots: []string{harness.RootSANBoot}, Nets: []bool{false}}) {
		if r.SecureBoot != "" {
			san = append(san, r.Label())
		}
	}
	assert.DeepEqual(t, san, []string{"amd64/ovmf-pxe root=sanboot secure-boot=on", "arm64/aavmf-ipxe root=sanboot secure-boot=on"})
	assert.Equal(t, len(Row{Arch: "amd64", Firmware: "ovmf-shim", Fault: "unsigned-kernel", Expect: failure.SecureBoot}.Spec().Steps), 0)
}
