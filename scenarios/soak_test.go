package scenarios

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"
)

// TestSoakCLI runs a small "nbh soak": two boots of one row, no flake, and
// the process's files, goroutines and lab folders back at their baseline.
// (The 200-boot soak across every chain is run by hand; its numbers are in
// the notes of the issue that added soak.)
func TestSoakCLI(t *testing.T) {
	guestTest(t)
	bin := buildNBH(t)
	out := filepath.Join(t.TempDir(), "soak.json")
	cmd := exec.Command(bin, "soak", "--boots", "2", "--arch", "amd64", "--firmware", "direct", "--roots", "none",
		"--ipsec", "off", "-j", "1", "--json", out, "--artifacts", filepath.Join(t.TempDir(), "flakes"))
	b, err := cmd.CombinedOutput()
	assert.NilError(t, err, "%s", b)
	assert.Check(t, is.Contains(string(b), "no flake, nothing left behind"))
	var s struct {
		Boots  int `json:"boots"`
		Chains []struct {
			Chain string  `json:"chain"`
			Boots int     `json:"boots"`
			P50   float64 `json:"p50_seconds_to_marker"`
		} `json:"chains"`
		Flakes []any `json:"flakes"`
		Leaks  []any `json:"leaks"`
		Before struct {
			FDs int `json:"fds"`
		} `json:"before"`
		PeakRSS float64 `json:"peak_rss_mib"`
	}
	j, err := os.ReadFile(out)
	assert.NilError(t, err)
	assert.NilError(t, json.Unmarshal(j, &s))
	assert.Equal(t, s.Boots, 2)
	assert.Equal(t, len(s.Chains), 1)
	assert.Equal(t, s.Chains[0].Chain, "amd64/direct")
	assert.Check(t, s.Chains[0].P50 > 1, "p50 %v", s.Chains[0].P50)
	assert.Check(t, len(s.Flakes) == 0 && len(s.Leaks) == 0, "%s", j)
	assert.Check(t, s.Before.FDs > 2 && s.PeakRSS > 1, "%s", j)
}
