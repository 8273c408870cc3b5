// Package ci holds the scripts CI jobs call (fresh-check) and checks the
// workflows in .github/workflows, so a broken workflow fails here, not on
// the first push.
package ci

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/rhysd/actionlint"
	"gotest.tools/v3/assert"
)

// Every workflow passes actionlint (syntax, job and step keys, expressions,
// known actions' inputs, matrix references).
func TestWorkflowsPassActionlint(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("..", ".github", "workflows", "*.y*ml"))
	assert.NilError(t, err)
	assert.Assert(t, len(files) > 0, "no workflow in .github/workflows")
	var out bytes.Buffer
	l, err := actionlint.NewLinter(&out, &actionlint.LinterOptions{Oneline: true})
	assert.NilError(t, err)
	errs, err := l.LintFiles(files, nil)
	assert.NilError(t, err)
	for _, e := range errs {
		t.Errorf("%s:%d:%d: %s [%s]", e.Filepath, e.Line, e.Column, e.Message, e.Kind)
	}
}

// The linter is not a no-op: a workflow with a job that has no runs-on and a
// step that names an unknown input fails.
func TestActionlintCatchesABrokenWorkflow(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yml")
	assert.NilError(t, os.WriteFile(bad, []byte("on: push\njobs:\n  - name: x\n    run: make test\n"), 0o644))
	l, err := actionlint.NewLinter(&bytes.Buffer{}, &actionlint.LinterOptions{})
	assert.NilError(t, err)
	errs, err := l.LintFiles([]string{bad}, nil)
	assert.NilError(t, err)
	assert.Assert(t, len(errs) > 0, "actionlint accepted a jobs list")
}
