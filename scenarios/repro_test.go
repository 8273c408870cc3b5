package scenarios

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"
)

// TestFailedBootReplaysFromItsBundle is the repro workflow as a person runs
// it: a failed nbh boot names its bundle; the bundle, moved to another folder
// and packed, replays from yet another working folder with the same outcome;
// a damaged bundle is exit status 2.
func TestFailedBootReplaysFromItsBundle(t *testing.T) {
	guestTest(t)
	if !selected("amd64", "seabios-ipxe") {
		t.Skip("amd64/seabios-ipxe not selected")
	}
	bin := buildNBH(t)
	run := func(dir string, args ...string) (string, int) {
		cmd := exec.Command(bin, args...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else {
			assert.NilError(t, err)
		}
		return string(out), code
	}
	work := t.TempDir()
	out, code := run(work, "boot", "--arch", "amd64", "--firmware", "seabios-ipxe", "--fault", "missing-kernel", "--artifacts", "art", "--quiet")
	assert.Equal(t, code, 1, out)
	assert.Check(t, is.Contains(out, "reproduce: nbh repro art\n"), out)
	for _, f := range []string{"spec.json", "verdict.json", "pins-amd64.json", "console.log", "timeline.jsonl", "network.pcapng"} {
		_, err := os.Stat(filepath.Join(work, "art", f))
		assert.Check(t, err == nil, "the bundle has no %s", f)
	}

	// Elsewhere, packed: paths inside the bundle are relative.
	moved := filepath.Join(t.TempDir(), "from-ci")
	assert.NilError(t, os.Rename(filepath.Join(work, "art"), moved))
	out, code = run(work, "bundle", "pack", moved)
	assert.Equal(t, code, 0, out)
	packed := moved + ".tar.zst"
	out, code = run(t.TempDir(), "repro", "--quiet", packed)
	assert.Equal(t, code, 0, out)
	assert.Check(t, is.Contains(out, "REPRODUCED: boot file fetch failed at loader"), out)
	assert.Check(t, is.Regexp(`(?m)^outcome\s+boot file fetch failed at loader\s+boot file fetch failed at loader$`, out))
	assert.Check(t, is.Regexp(`(?m)^loader\s+\d+\.\d\ds\s+\d+\.\d\ds$`, out))

	// A bundle from a newer nbh, and no bundle at all: exit 2, said why.
	spec := filepath.Join(moved, "spec.json")
	b, err := os.ReadFile(spec)
	assert.NilError(t, err)
	assert.NilError(t, os.WriteFile(spec, []byte(strings.Replace(string(b), `"format": 1`, `"format": 9`, 1)), 0o644))
	out, code = run(work, "repro", moved)
	assert.Equal(t, code, 2, out)
	assert.Check(t, is.Contains(out, "format 9"), out)
	out, code = run(work, "repro", filepath.Join(work, "nothing-here"))
	assert.Equal(t, code, 2, out)
}
