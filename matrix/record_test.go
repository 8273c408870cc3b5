package matrix

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/timeline"
)

func TestRow2Report(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "artifacts", "x")
	assert.NilError(t, os.MkdirAll(dir, 0o755))
	log := "[   0.100] U-Boot\n[   1.000] TFTP from server 10.0.2.2; our IP address is 10.0.2.15\n[   2.300] TFTP error: 'File not found' (1)\n"
	assert.NilError(t, os.WriteFile(filepath.Join(dir, "console.log"), []byte(log), 0o644))
	t0 := time.Now()
	res := Result{
		Row:     Row{Arch: "arm64", Firmware: "uboot", Fault: "missing-kernel", Expect: failure.LoaderFetch},
		Verdict: harness.Verdict{Reason: failure.LoaderFetch, Stage: timeline.Loader, Line: "TFTP error: 'File not found' (1)", Elapsed: 2300 * time.Millisecond},
		Spans:   []timeline.Span{{Stage: timeline.Firmware, Start: t0, Duration: time.Second}, {Stage: timeline.Loader, Start: t0.Add(time.Second), Duration: 1300 * time.Millisecond}},
		Dir:     dir,
	}
	row := Row2Report(res, base)
	assert.Equal(t, row.ID, "arm64-uboot+missing-kernel")
	assert.Equal(t, row.Pass, true)
	assert.Equal(t, row.Expect, "boot file fetch failed")
	assert.Equal(t, row.Outcome, "boot file fetch failed at loader")
	assert.Equal(t, row.Verdict.ConsoleLine, 3)
	assert.Equal(t, row.Artifacts.Console, "artifacts/x/console.log")
	assert.Equal(t, row.Artifacts.Network, "", "no capture was written")
	assert.Equal(t, row.Spans[1].StartSeconds, 1.0)
	assert.Equal(t, row.Spans[1].DeadlineSeconds, harness.DefaultStageTimeouts()[timeline.Loader].Seconds())

	res.Err = errors.New("lab: no QEMU")
	row = Row2Report(res, base)
	assert.Equal(t, row.Pass, false)
	assert.Equal(t, row.Outcome, "error: lab: no QEMU")
}
