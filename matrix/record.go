package matrix

import (
	"bufio"
	"os"
	"path/filepath"
	"strings"
	"time"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/images"
	"nbh.dev/nbh/internal/version"
	"nbh.dev/nbh/report"
)

// Record makes the report of a run: rows from results, artifact paths
// relative to base (the folder the JSON report is written to), and the
// versions that made it.
func Record(results []Result, run report.Run, cache *images.Cache, base, accel string) *report.Report {
	r := &report.Report{
		Format: report.Format, Generated: time.Now().UTC(), NBH: version.String(),
		QEMU: map[string]string{}, Accel: map[string]string{}, Pins: map[string][]string{},
		Runs: []report.Run{run},
	}
	arches := map[string]bool{}
	for _, res := range results {
		arches[res.Row.Arch] = true
		r.Rows = append(r.Rows, Row2Report(res, base))
	}
	for a := range arches {
		r.QEMU[a] = qemu.Version(a)
		if acc, err := qemu.Choose(a, accel); err == nil {
			r.Accel[a] = acc.Name + ": " + acc.Why
		}
		if cache != nil {
			r.Pins[a] = cache.Pins(a)
		}
	}
	return r
}

// Row2Report is a result as a report row.
func Row2Report(res Result, base string) report.Row {
	row := res.Row
	v := res.Verdict
	out := report.Row{
		ID: row.ID(), Arch: row.Arch, Firmware: row.Firmware, Chain: row.Chain(),
		Root: row.RootName(), Network: row.Network(), Fault: row.Fault,
		Expect: row.Expected(), Pass: res.Pass(), WallSeconds: res.Wall.Seconds(), Start: res.Warm,
		Verdict: report.Verdict{OK: v.OK, Reason: string(v.Reason), Stage: v.Stage.String(), Line: v.Line,
			Detail: v.Detail, ElapsedSeconds: v.Elapsed.Seconds(), Tail: v.Tail, Warnings: v.Warnings},
	}
	switch {
	case res.Err != nil:
		out.Error = res.Err.Error()
		out.Outcome = "error: " + out.Error
	case v.OK:
		out.Outcome = "marker"
	default:
		out.Outcome = string(v.Reason) + " at " + v.Stage.String()
	}
	var first time.Time
	if len(res.Spans) > 0 {
		first = res.Spans[0].Start
	}
	for _, sp := range res.Spans {
		s := report.Span{Stage: sp.Stage.String(), StartSeconds: sp.Start.Sub(first).Seconds(), Seconds: sp.Duration.Seconds()}
		if d, ok := harness.DefaultStageTimeouts()[sp.Stage]; ok {
			s.DeadlineSeconds = d.Seconds()
		}
		out.Spans = append(out.Spans, s)
	}
	if res.Dir != "" {
		rel := func(name string) string {
			p := filepath.Join(res.Dir, name)
			if _, err := os.Stat(p); err != nil {
				return ""
			}
			return report.RelativeTo(base, p)
		}
		out.Artifacts = report.Artifacts{Console: rel("console.log"), Timeline: rel("timeline.jsonl"), Network: rel("network.pcapng")}
		if rel("spec.json") != "" {
			out.Artifacts.Bundle = report.RelativeTo(base, res.Dir)
		}
		if v.Line != "" {
			out.Verdict.ConsoleLine = consoleLine(filepath.Join(res.Dir, "console.log"), v.Line)
		}
	}
	return out
}

// consoleLine finds the line number of the deciding line in console.log
// (lines there carry a "[  seconds] " prefix): the first exact match, else
// the first that contains it.
func consoleLine(path, line string) int {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	want := strings.TrimSpace(line)
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	contains := 0
	for n := 1; sc.Scan(); n++ {
		text := sc.Text()
		if i := strings.Index(text, "] "); strings.HasPrefix(text, "[") && i > 0 {
			text = text[i+2:]
		}
		text = strings.TrimSpace(text)
		if text == want {
			return n
		}
		if contains == 0 && want != "" && strings.Contains(text, want) {
			contains = n
		}
	}
	return contains
}
