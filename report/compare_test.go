package report

import (
	"strings"
	"testing"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"
)

// Rows pair by ID; a different verdict, a pass that became a failure and a
// row only one run has each differ; the same outcome does not, whatever the
// times.
func TestCompare(t *testing.T) {
	a := &Report{Runs: []Run{{WallSeconds: 100}}, Rows: []Row{
		{ID: "r1", Pass: true, Outcome: "marker", WallSeconds: 20},
		{ID: "r2", Pass: true, Outcome: "no DHCP lease at dhcp", WallSeconds: 10},
		{ID: "r3", Pass: true, Outcome: "marker", WallSeconds: 10},
		{ID: "r4", Pass: true, Outcome: "marker", WallSeconds: 10},
	}}
	b := &Report{Runs: []Run{{WallSeconds: 60}}, Rows: []Row{
		{ID: "r4", Pass: false, Outcome: "marker", WallSeconds: 5},
		{ID: "r1", Pass: true, Outcome: "marker", WallSeconds: 5, Start: "warm: restored"},
		{ID: "r2", Pass: true, Outcome: "no DHCP lease at loader", WallSeconds: 10},
		{ID: "r5", Pass: true, Outcome: "marker", WallSeconds: 1},
	}}
	c := Compare(a, b)
	assert.Equal(t, len(c.Pairs), 5)
	differ := map[string]bool{}
	for _, p := range c.Pairs {
		differ[p.ID] = p.Differ
	}
	assert.DeepEqual(t, differ, map[string]bool{"r1": false, "r2": true, "r3": true, "r4": true, "r5": true})
	assert.Equal(t, c.Differ, 4)
	var out strings.Builder
	c.Write(&out, "cold", "warm")
	assert.Check(t, is.Contains(out.String(), "1 with the same outcome, 4 differ"))
	assert.Check(t, is.Contains(out.String(), "wall time: cold 100s, warm 60s (40% saved)"))
	assert.Check(t, is.Contains(out.String(), "75%")) // r1: 20s -> 5s
}
