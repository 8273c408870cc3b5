package scenarios

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"

	"nbh.dev/nbh/harness/nbhtest"
)

// checkout is the nbh module this test runs in.
func checkout(t *testing.T) string {
	dir, err := filepath.Abs("..")
	assert.NilError(t, err)
	b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	assert.NilError(t, err)
	assert.Assert(t, strings.HasPrefix(string(b), "module nbh.dev/nbh\n"), "%s is not the nbh module", dir)
	return dir
}

// myScenario is a user's whole scenario, in a module of their own.
const myScenario = `package mylab

import (
	"testing"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/nbhtest"
)

func TestMyBoot(t *testing.T) {
	g, err := nbhtest.NewLab(t).Boot(t.Context(), harness.Spec{Arch: "amd64", Firmware: "direct"})
	if err != nil {
		t.Fatal(err)
	}
	if v := g.Wait(t.Context()); !v.OK {
		t.Fatal(v.Err())
	}
}
`

// TestScenarioInAnotherModule uses nbh the way another project does: a
// module outside this tree requires nbh (replaced by this checkout), holds a
// scenario of under 20 lines, and go test runs it to the marker. Nothing of
// nbh's source tree is found at run time: the init is built from the copy
// inside nbh.
func TestScenarioInAnotherModule(t *testing.T) {
	guestTest(t)
	if !selected("amd64", "direct") {
		t.Skip("amd64/direct not selected")
	}
	assert.Assert(t, strings.Count(myScenario, "\n") < 20, "the scenario grew to %d lines", strings.Count(myScenario, "\n"))
	src := checkout(t)
	mod := t.TempDir()
	gomod := "module example.com/mylab\n\ngo 1.26.3\n\nrequire nbh.dev/nbh v0.0.0\n\nreplace nbh.dev/nbh => " + src + "\n"
	assert.NilError(t, os.WriteFile(filepath.Join(mod, "go.mod"), []byte(gomod), 0o644))
	sum, err := os.ReadFile(filepath.Join(src, "go.sum"))
	assert.NilError(t, err)
	assert.NilError(t, os.WriteFile(filepath.Join(mod, "go.sum"), sum, 0o644))
	assert.NilError(t, os.WriteFile(filepath.Join(mod, "my_test.go"), []byte(myScenario), 0o644))

	cmd := exec.Command("go", "test", "-mod=mod", "-count=1", "-v", "./...")
	cmd.Dir = mod
	cmd.Env = append(os.Environ(), "NBH_CACHE="+nbhtest.Cache().Dir, "GOFLAGS=", "GOWORK=off")
	out, err := cmd.CombinedOutput()
	assert.NilError(t, err, "%s", out)
	assert.Check(t, is.Contains(string(out), "--- PASS: TestMyBoot"))
	// nbhtest put the guest's outcome and stage times on the test.
	assert.Check(t, is.Contains(string(out), "=== ATTR  TestMyBoot nbh.g1.outcome marker"))
	assert.Check(t, is.Contains(string(out), "=== ATTR  TestMyBoot nbh.g1.kernel "))
}

// TestTrimmedBinaryElsewhere boots with an nbh built with -trimpath and
// copied out of the tree, run from a folder that is no module.
func TestTrimmedBinaryElsewhere(t *testing.T) {
	guestTest(t)
	if !selected("amd64", "direct") {
		t.Skip("amd64/direct not selected")
	}
	bin := filepath.Join(t.TempDir(), "nbh")
	build := exec.Command("go", "build", "-trimpath", "-o", bin, "nbh.dev/nbh/cmd/nbh")
	out, err := build.CombinedOutput()
	assert.NilError(t, err, "%s", out)
	moved := filepath.Join(t.TempDir(), "bin", "nbh")
	assert.NilError(t, os.MkdirAll(filepath.Dir(moved), 0o755))
	assert.NilError(t, os.Rename(bin, moved))
	cmd := exec.Command(moved, "boot", "--arch", "amd64", "--firmware", "direct", "--quiet")
	cmd.Dir = t.TempDir()
	cmd.Env = append(os.Environ(), "NBH_CACHE="+nbhtest.Cache().Dir)
	out, err = cmd.CombinedOutput()
	assert.NilError(t, err, "%s", out)
	assert.Check(t, is.Contains(string(out), "OK: amd64/direct reached the marker"))
}
