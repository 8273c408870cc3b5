package scenarios

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/console"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/netfab"
	"nbh.dev/nbh/harness/warm"
	"nbh.dev/nbh/internal/sched"
	"nbh.dev/nbh/matrix"
)

// TestWarmStart boots matrix rows of amd64/ovmf-http with warm starts: the
// first row boots OVMF from reset and saves it at its first DHCP request,
// the next two (an NFS root, and no-dhcp, a fault that must still fail as
// it fails cold) start from that snapshot. Each row shows what the cold
// matrix expects of it, and the NFS row the same outcome and stages as the
// same row booted cold; a restored row's console begins with what OVMF
// printed before the save and its capture with the frames it sent before
// it, the DHCP request the lab then answers. A Secure Boot row whose db
// holds the lab's own key starts cold and says why. A snapshot damaged in
// the store does not restore: its row boots from reset and says so, and
// the snapshot is gone.
func TestWarmStart(t *testing.T) {
	needGuests(t)
	t.Parallel()
	if !selected("amd64", "ovmf-http") {
		t.Skip("amd64/ovmf-http not selected")
	}
	chain, _ := harness.LookupChain("amd64", "ovmf-http")
	all := matrix.Rows(matrix.Select{Chains: []harness.Chain{chain}, Roots: []string{harness.RootNone, harness.RootNFS}, Nets: []bool{false}, Faults: true})
	pick := func(label string) matrix.Row {
		i := slices.IndexFunc(all, func(r matrix.Row) bool { return r.Label() == label })
		assert.Assert(t, i >= 0, "no row %q", label)
		return all[i]
	}
	rows := []matrix.Row{pick("amd64/ovmf-http"), pick("amd64/ovmf-http root=nfs"), pick("amd64/ovmf-http +no-dhcp"), pick("amd64/ovmf-http secure-boot=on")}
	store, err := warm.Open(filepath.Join(t.TempDir(), "warm"))
	assert.NilError(t, err)
	arts := t.TempDir()
	var results []matrix.Result
	for _, r := range rows {
		release, err := sched.Shared().Acquire(t.Context())
		assert.NilError(t, err)
		results = append(results, matrix.Run(t.Context(), []matrix.Row{r}, matrix.Config{
			Jobs: 1, Artifacts: arts, KeepPassed: true, Cache: nbhtest.Cache(), Warm: store,
		})...)
		release()
	}
	assert.Equal(t, len(results), len(rows))
	for _, res := range results {
		assert.Assert(t, res.Pass(), "%s: %v (expected %s)", res.Row.Label(), res.Verdict.Err(), res.Row.Expected())
	}
	assert.Check(t, is.Contains(results[0].Warm, "saved:"))
	assert.Check(t, is.Contains(results[1].Warm, "warm:"))
	assert.Check(t, is.Contains(results[2].Warm, "warm:"))
	assert.Check(t, is.Contains(results[3].Warm, "cold: the firmware's Secure Boot db holds this lab's own key"))

	// The same row cold: the same outcome, through the same stages.
	release, err := sched.Shared().Acquire(t.Context())
	assert.NilError(t, err)
	cold := matrix.Run(t.Context(), []matrix.Row{rows[1]}, matrix.Config{Jobs: 1, Cache: nbhtest.Cache()})
	release()
	assert.Equal(t, len(cold), 1)
	assert.Equal(t, cold[0].Warm, "")
	assert.Equal(t, cold[0].Pass(), results[1].Pass())
	assert.Equal(t, cold[0].Verdict.OK, results[1].Verdict.OK)
	assert.Equal(t, cold[0].Verdict.Reason, results[1].Verdict.Reason)
	assert.DeepEqual(t, stagesOf(cold[0].Spans), stagesOf(results[1].Spans))

	ents, err := os.ReadDir(store.Dir())
	assert.NilError(t, err)
	assert.Equal(t, len(ents), 1, "one machine, one snapshot")
	snapDir := filepath.Join(store.Dir(), ents[0].Name())
	saved, err := os.ReadFile(filepath.Join(snapDir, "console"))
	assert.NilError(t, err)
	var frames [][]byte
	b, err := os.ReadFile(filepath.Join(snapDir, "frames"))
	assert.NilError(t, err)
	assert.NilError(t, json.Unmarshal(b, &frames))
	assert.Assert(t, len(frames) > 0)
	last := frames[len(frames)-1]
	assert.Assert(t, !netfab.Announces(last), "the save was not at a request")

	// What the console showed before the save begins each restored row's
	// console, and the maker's: the firmware ran once.
	assert.Assert(t, len(console.Plain(string(saved))) > 0, "OVMF printed nothing before its first request")
	for _, res := range results[:3] {
		text := consoleText(t, filepath.Join(res.Dir, "console.log"))
		assert.Assert(t, strings.HasPrefix(text, console.Plain(string(saved))), "%s: its console does not begin with the snapshot's:\n%q\n%q", res.Row.Label(), text[:min(len(text), 300)], console.Plain(string(saved)))

		capture, err := netfab.ReadCapture(filepath.Join(res.Dir, "network.pcapng"))
		assert.NilError(t, err)
		var sent [][]byte
		for _, f := range capture {
			if !f.Inbound {
				sent = append(sent, f.Data)
			}
		}
		assert.Assert(t, len(sent) >= len(frames), "%s", res.Row.Label())
		for i := range frames {
			assert.Assert(t, bytes.Equal(sent[i], frames[i]), "%s: frame %d is not the snapshot's", res.Row.Label(), i)
		}
	}
	// Restored rows ran QEMU from the saved state.
	for i, res := range results {
		tl, err := os.ReadFile(filepath.Join(res.Dir, "timeline.jsonl"))
		assert.NilError(t, err)
		assert.Equal(t, strings.Contains(string(tl), "-incoming exec:cat"), i == 1 || i == 2, "%s", res.Row.Label())
	}

	// A damaged snapshot: the row boots from reset and says why.
	state := filepath.Join(snapDir, "state")
	fi, err := os.Stat(state)
	assert.NilError(t, err)
	assert.NilError(t, os.Truncate(state, fi.Size()/2))
	release, err = sched.Shared().Acquire(t.Context())
	assert.NilError(t, err)
	again := matrix.Run(t.Context(), []matrix.Row{rows[0]}, matrix.Config{Jobs: 1, Cache: nbhtest.Cache(), Warm: store})
	release()
	assert.Equal(t, len(again), 1)
	assert.Assert(t, again[0].Pass(), "%v", again[0].Verdict.Err())
	assert.Check(t, is.Contains(again[0].Warm, "cold: its snapshot did not restore"))
	_, err = os.Stat(snapDir)
	assert.Assert(t, os.IsNotExist(err), "the damaged snapshot is still in the store")
}

// consoleText is console.log's text without its time stamps, its line
// breaks and the marks of cut lines, and without control bytes
// (console.Plain): what the guest wrote, as one string.
func consoleText(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	assert.NilError(t, err)
	var out strings.Builder
	for _, l := range strings.Split(string(b), "\n") {
		if _, text, ok := strings.Cut(l, "] "); ok {
			out.WriteString(strings.TrimSuffix(text, " ⏎"))
		}
	}
	return console.Plain(out.String())
}
