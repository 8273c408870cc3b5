package report_test

import (
	"context"
	"encoding/xml"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/internal/browser"
	"nbh.dev/nbh/report"
	"nbh.dev/nbh/report/reporttest"
)

// sample is a report with a passing row, a failed row with a console log
// whose 3rd line decided, and a row whose artifacts were not kept; its
// artifact paths are relative to dir, where the console log is written.
func sample(t *testing.T, dir string) *report.Report {
	t.Helper()
	art := filepath.Join(dir, "artifacts", "arm64-uboot+missing-kernel")
	assert.NilError(t, os.MkdirAll(art, 0o755))
	console := "[   0.100] U-Boot 2023.01\n[   1.500] DHCP client bound\n[   2.300] TFTP error: 'File not found' (1)\n[   2.400] <script>alert(1)</script> \x1b[0m\n"
	assert.NilError(t, os.WriteFile(filepath.Join(art, "console.log"), []byte(console), 0o644))
	assert.NilError(t, os.WriteFile(filepath.Join(art, "timeline.jsonl"), []byte("{}\n"), 0o644))
	spans := []report.Span{{Stage: "firmware", Seconds: 1.5, DeadlineSeconds: 60}, {Stage: "dhcp", StartSeconds: 1.5, Seconds: 0.1, DeadlineSeconds: 30}, {Stage: "loader", StartSeconds: 1.6, Seconds: 0.7, DeadlineSeconds: 90}}
	return &report.Report{
		Format: report.Format, Generated: time.Date(2026, 11, 28, 7, 0, 0, 0, time.UTC), NBH: "test",
		QEMU: map[string]string{"arm64": "QEMU emulator version 7.2.22"}, Pins: map[string][]string{"arm64": {"u-boot-qemu 2023.01"}},
		Runs: []report.Run{{Host: "h", Jobs: 2, WallSeconds: 10}},
		Rows: []report.Row{
			{ID: "arm64-uboot", Arch: "arm64", Firmware: "uboot", Chain: "arm64/uboot", Root: "none", Network: "clear",
				Expect: "marker", Pass: true, Outcome: "marker", Spans: spans,
				Verdict: report.Verdict{OK: true, Stage: "init", ElapsedSeconds: 5}},
			{ID: "arm64-uboot+missing-kernel", Arch: "arm64", Firmware: "uboot", Chain: "arm64/uboot", Root: "none", Network: "clear",
				Fault: "missing-kernel", Expect: "no DHCP lease", Pass: false, Outcome: "boot file fetch failed at loader", Spans: spans,
				Verdict: report.Verdict{Reason: "boot file fetch failed", Stage: "loader", Line: "TFTP error: 'File not found' (1)", ConsoleLine: 3,
					Detail: "the boot server answered 404", ElapsedSeconds: 2.3, Tail: []string{"TFTP error: 'File not found' (1)", "\x1b[0m<b>"}},
				Artifacts: report.Artifacts{Console: "artifacts/arm64-uboot+missing-kernel/console.log", Timeline: "artifacts/arm64-uboot+missing-kernel/timeline.jsonl",
					Network: "artifacts/arm64-uboot+missing-kernel/network.pcapng"}}, // not there: no link
			{ID: "amd64-direct-root-nfs", Arch: "amd64", Firmware: "direct", Chain: "amd64/direct", Root: "nfs", Network: "ipsec",
				Expect: "marker", Pass: true, Outcome: "marker", Verdict: report.Verdict{OK: true, Stage: "root", ElapsedSeconds: 7}},
		},
	}
}

func TestJUnitHasACasePerRowAndAFailurePerFailedRow(t *testing.T) {
	dir := t.TempDir()
	r := sample(t, dir)
	path := filepath.Join(dir, "junit.xml")
	assert.NilError(t, r.WriteJUnit(path))
	b, err := os.ReadFile(path)
	assert.NilError(t, err)
	var doc struct {
		Suites []struct {
			Name  string `xml:"name,attr"`
			Cases []struct {
				Classname string `xml:"classname,attr"`
				Name      string `xml:"name,attr"`
				Props     []struct {
					Name  string `xml:"name,attr"`
					Value string `xml:"value,attr"`
				} `xml:"properties>property"`
				Failure *struct {
					Message string `xml:"message,attr"`
					Body    string `xml:",chardata"`
				} `xml:"failure"`
				SystemOut string `xml:"system-out"`
			} `xml:"testcase"`
		} `xml:"testsuite"`
	}
	assert.NilError(t, xml.Unmarshal(b, &doc), string(b))
	tests, failures, err := reporttest.JUnitCounts(path)
	assert.NilError(t, err)
	assert.Equal(t, tests, 3)
	assert.Equal(t, failures, 1)
	var cases, failed int
	for _, s := range doc.Suites {
		for _, c := range s.Cases {
			cases++
			assert.Equal(t, c.Classname, s.Name)
			if c.Failure != nil {
				failed++
				assert.Equal(t, c.Name, "none/clear/missing-kernel")
				assert.Assert(t, strings.Contains(c.Failure.Message, "boot file fetch failed at loader; expected no DHCP lease"), c.Failure.Message)
				assert.Assert(t, strings.Contains(c.Failure.Body, "the boot server answered 404"))
				assert.Assert(t, strings.Contains(c.SystemOut, "TFTP error"))
				props := map[string]string{}
				for _, p := range c.Props {
					props[p.Name] = p.Value
				}
				assert.Equal(t, props["stage.loader.seconds"], "0.70")
			}
		}
	}
	assert.Equal(t, cases, 3)
	assert.Equal(t, failed, 1)
}

func TestJSONRoundTripAndMerge(t *testing.T) {
	dir := t.TempDir()
	r := sample(t, dir)
	path := filepath.Join(dir, "matrix.json")
	assert.NilError(t, r.WriteJSON(path))
	back, err := report.ReadJSON(path)
	assert.NilError(t, err)
	// Artifact paths come back relative to here, pointing at the same file.
	_, err = os.Stat(back.Rows[1].Artifacts.Console)
	assert.NilError(t, err)

	other := &report.Report{Format: report.Format, NBH: "test", Runs: []report.Run{{Host: "h2", Shard: "2/2"}},
		Rows: []report.Row{{ID: "amd64-seabios-ipxe", Chain: "amd64/seabios-ipxe", Pass: false}}}
	m, err := report.Merge(back, other)
	assert.NilError(t, err)
	assert.Equal(t, len(m.Rows), 4)
	assert.Equal(t, len(m.Runs), 2)
	assert.Equal(t, m.Failed(), 2)
	_, err = report.Merge(back, back)
	assert.ErrorContains(t, err, "is in two reports")

	b, _ := os.ReadFile(path)
	assert.NilError(t, os.WriteFile(path, []byte(strings.Replace(string(b), `"format": 1`, `"format": 99`, 1)), 0o644))
	_, err = report.ReadJSON(path)
	assert.ErrorContains(t, err, "report format 99")
}

// The HTML report in a real browser: every row there, the failed one marked,
// links resolving to files (the console page anchored at the deciding line),
// the filters working from the address, nothing fetched from elsewhere.
func TestHTMLInChromium(t *testing.T) {
	if browser.Binary() == "" {
		if testing.Short() {
			t.Skip(browser.ErrNoChromium)
		}
		t.Fatal(browser.ErrNoChromium)
	}
	dir := t.TempDir()
	r := sample(t, dir)
	// The renderer takes artifact paths relative to the current folder.
	for i := range r.Rows {
		if c := r.Rows[i].Artifacts.Console; c != "" {
			a := &r.Rows[i].Artifacts
			a.Console, a.Timeline, a.Network = filepath.Join(dir, a.Console), filepath.Join(dir, a.Timeline), filepath.Join(dir, a.Network)
		}
	}
	out := filepath.Join(dir, "html")
	assert.NilError(t, r.WriteHTML(out))

	page, err := reporttest.Render(context.Background(), out, "")
	assert.NilError(t, err)
	assert.Equal(t, len(page.Rows), 3)
	assert.DeepEqual(t, page.Failed, []string{"arm64-uboot+missing-kernel"})
	assert.Equal(t, len(page.Hidden), 0)
	assert.Equal(t, page.Shown, "3 shown") // the script ran
	assert.NilError(t, reporttest.CheckLinks(out, page.Links))
	var consoleLink, pcap bool
	for _, l := range page.Links {
		consoleLink = consoleLink || strings.HasSuffix(l, "console/arm64-uboot+missing-kernel.html#L3")
		pcap = pcap || strings.HasSuffix(l, ".pcapng")
	}
	assert.Assert(t, consoleLink, "no link to the deciding console line in %v", page.Links)
	assert.Assert(t, !pcap, "a link to a capture that was not kept: %v", page.Links)
	cp, err := os.ReadFile(filepath.Join(out, "console", "arm64-uboot+missing-kernel.html"))
	assert.NilError(t, err)
	assert.Assert(t, strings.Contains(string(cp), `class="l hl" id="L3"`), "deciding line not highlighted")
	assert.Assert(t, !strings.Contains(string(cp), "<script>alert"), "console text not escaped")

	// Filters from the address: only the failed row stays visible.
	page, err = reporttest.Render(context.Background(), out, "outcome=fail")
	assert.NilError(t, err)
	assert.DeepEqual(t, page.Hidden, []string{"arm64-uboot", "amd64-direct-root-nfs"})
	assert.Equal(t, page.Shown, "1 shown")
	page, err = reporttest.Render(context.Background(), out, "arch=amd64&network=ipsec")
	assert.NilError(t, err)
	assert.DeepEqual(t, page.Hidden, []string{"arm64-uboot", "arm64-uboot+missing-kernel"})

	idx, err := os.ReadFile(filepath.Join(out, "index.html"))
	assert.NilError(t, err)
	for _, bad := range []string{"http://", "https://", "src=\""} {
		assert.Assert(t, !strings.Contains(string(idx), bad), "index.html fetches something: %q", bad)
	}
}
