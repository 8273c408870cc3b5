package scenarios

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/internal/browser"
	"nbh.dev/nbh/internal/sched"
	"nbh.dev/nbh/matrix"
	"nbh.dev/nbh/report"
	"nbh.dev/nbh/report/reporttest"
)

// TestMatrixReports runs real matrix rows on arm64/uboot — one that boots,
// one fault classified as expected, and one whose expectation is wrong on
// purpose, so the reports carry a real failed row — and checks the three
// renderings: JUnit testcases equal the rows and failures the failed rows,
// the JSON reads back, and headless Chromium shows one row per boot with the
// failed one marked and every link resolving.
func TestMatrixReports(t *testing.T) {
	needGuests(t)
	t.Parallel()
	if !selected("arm64", "uboot") {
		t.Skip("arm64/uboot not selected")
	}
	if browser.Binary() == "" {
		t.Fatal(browser.ErrNoChromium)
	}
	rows := []matrix.Row{
		{Arch: "arm64", Firmware: "uboot"},
		{Arch: "arm64", Firmware: "uboot", Fault: "missing-kernel", Expect: failure.LoaderFetch},
		// Expected wrongly on purpose: the archive breaks off at the
		// loader, no kernel ever panics.
		{Arch: "arm64", Firmware: "uboot", Fault: "truncated-archive", Expect: failure.KernelPanic},
	}
	dir := t.TempDir()
	// One row at a time, each holding a slot of the shared scheduler.
	var results []matrix.Result
	for _, r := range rows {
		release, err := sched.Shared().Acquire(t.Context())
		assert.NilError(t, err)
		results = append(results, matrix.Run(t.Context(), []matrix.Row{r}, matrix.Config{
			Jobs: 1, Artifacts: filepath.Join(dir, "artifacts"), Cache: nbhtest.Cache(),
		})...)
		release()
	}
	assert.Equal(t, len(results), 3)
	assert.Assert(t, results[0].Pass(), "%v", results[0].Verdict.Err())
	assert.Assert(t, results[1].Pass(), "%v", results[1].Verdict.Err())
	assert.Assert(t, !results[2].Pass())
	assert.Equal(t, results[2].Verdict.Reason, failure.LoaderFetch, "%v", results[2].Verdict.Err())
	// Only the failed row keeps its artifacts.
	assert.Equal(t, results[0].Dir, "")
	_, err := os.Stat(filepath.Join(results[2].Dir, "console.log"))
	assert.NilError(t, err)

	rep := matrix.Record(results, report.Run{Host: "test", Jobs: 1}, nbhtest.Cache(), dir, os.Getenv("NBH_ACCEL"))
	jsonPath := filepath.Join(dir, "matrix.json")
	assert.NilError(t, rep.WriteJSON(jsonPath))
	back, err := report.ReadJSON(jsonPath)
	assert.NilError(t, err)
	assert.Equal(t, len(back.Rows), 3)
	assert.Equal(t, back.Failed(), 1)
	failed := back.Rows[2]
	assert.Assert(t, failed.Verdict.ConsoleLine > 0, "the deciding line %q was not found in console.log", failed.Verdict.Line)
	assert.Assert(t, len(back.Pins["arm64"]) > 0 && strings.HasPrefix(back.QEMU["arm64"], "QEMU"), "versions missing: %+v %+v", back.Pins, back.QEMU)
	// The failed row's folder is a repro bundle, and the report says so.
	assert.Equal(t, failed.Artifacts.Bundle, results[2].Dir)
	_, err = os.Stat(filepath.Join(failed.Artifacts.Bundle, "spec.json"))
	assert.NilError(t, err)

	junit := filepath.Join(dir, "junit.xml")
	assert.NilError(t, back.WriteJUnit(junit))
	tests, failures, err := reporttest.JUnitCounts(junit)
	assert.NilError(t, err)
	assert.Equal(t, tests, 3)
	assert.Equal(t, failures, 1)
	xml, err := os.ReadFile(junit)
	assert.NilError(t, err)
	assert.Assert(t, strings.Contains(string(xml), "reproduce: nbh repro "), "the JUnit failure does not say how to reproduce")

	html := filepath.Join(dir, "html")
	assert.NilError(t, back.WriteHTML(html))
	page, err := reporttest.Render(context.Background(), html, "")
	assert.NilError(t, err)
	assert.Equal(t, len(page.Rows), 3)
	assert.DeepEqual(t, page.Failed, []string{failed.ID})
	assert.NilError(t, reporttest.CheckLinks(html, page.Links))
	assert.Assert(t, strings.Contains(strings.Join(page.Links, " "), "console/"+failed.ID+".html#L"), "no anchored console link: %v", page.Links)
}
