package main

import (
	"testing"
	"time"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/matrix"
)

// soakRows takes the rows in turn, numbering the repeats, so each boot has
// an ID of its own.
func TestSoakRowsRoundRobin(t *testing.T) {
	rows := []matrix.Row{{Arch: "amd64", Firmware: "direct"}, {Arch: "arm64", Firmware: "uboot", Root: harness.RootNFS}}
	got := soakRows(rows, 5)
	assert.Equal(t, len(got), 5)
	ids := map[string]bool{}
	for i, r := range got {
		assert.Equal(t, r.Chain(), rows[i%2].Chain())
		ids[r.ID()] = true
	}
	assert.Equal(t, len(ids), 5, "two boots share an ID: %v", ids)
	assert.Equal(t, got[4].Label(), "amd64/direct #3")
}

// summarize counts a verdict its row did not expect as a flake (with its
// bundle), takes the times to marker of good boots only, and calls
// anything above the baseline a leak.
func TestSoakSummary(t *testing.T) {
	direct := matrix.Row{Arch: "amd64", Firmware: "direct"}
	fault := matrix.Row{Arch: "amd64", Firmware: "direct", Fault: "no-dhcp", Expect: failure.NoDHCP}
	ok := func(s float64) harness.Verdict {
		return harness.Verdict{OK: true, Elapsed: time.Duration(s * float64(time.Second))}
	}
	results := []matrix.Result{
		{Row: direct, Verdict: ok(10)}, {Row: direct, Verdict: ok(20)}, {Row: direct, Verdict: ok(30)},
		{Row: direct, Verdict: harness.Verdict{Reason: failure.NoDHCP}, Dir: "/tmp/x"}, // a flake
		{Row: fault, Verdict: harness.Verdict{Reason: failure.NoDHCP}},                 // expected
		{Row: fault, Verdict: ok(5)},                                                   // a flake: it booted
	}
	base := resourceUse{FDs: 10, Goroutines: 3}
	s := summarize(results, time.Hour, 2, base, base)
	assert.Equal(t, s.BootsPerHour, 6.0)
	assert.Equal(t, len(s.Flakes), 2)
	assert.Equal(t, s.Flakes[0].Repro, "nbh repro /tmp/x")
	assert.Equal(t, len(s.Chains), 1)
	assert.Equal(t, s.Chains[0].Flakes, 2)
	assert.Equal(t, s.Chains[0].P50, 20.0)
	assert.Equal(t, s.Chains[0].P95, 30.0)
	assert.Equal(t, len(s.Leaks), 0)
	s = summarize(results, time.Hour, 2, base, resourceUse{FDs: 11, Goroutines: 3, LabFolders: 1})
	assert.DeepEqual(t, s.Leaks, []string{"open files: 10 before, 11 after", "lab folders: 0 before, 1 after"})
}
