package report

import (
	"bufio"
	"fmt"
	"html/template"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Stages in boot order, as the timeline names them.
func Stages() []string { return []string{"firmware", "dhcp", "loader", "kernel", "init", "root"} }

var stageColor = map[string]string{
	"firmware": "#8e9aaf", "dhcp": "#f4a259", "loader": "#5b8e7d",
	"kernel": "#4a6fa5", "init": "#9b5de5", "root": "#2a9d8f",
}

// WriteHTML renders r into dir: index.html (self-contained: inline style,
// script and SVG, no fetches) and a page per kept console.log with the line
// that decided the boot highlighted and anchored. Artifact paths in r are
// taken relative to the current folder.
func (r *Report) WriteHTML(dir string) error {
	if err := os.MkdirAll(filepath.Join(dir, "console"), 0o755); err != nil {
		return err
	}
	rep := *r
	rep.Rows = append([]Row(nil), r.Rows...)
	// Console pages first: they exist before index.html links them.
	consolePage := map[string]string{}
	for _, row := range rep.Rows {
		if row.Artifacts.Console == "" {
			continue
		}
		if _, err := os.Stat(row.Artifacts.Console); err != nil {
			continue
		}
		page := filepath.Join("console", row.ID+".html")
		if err := writeConsolePage(filepath.Join(dir, page), row); err != nil {
			return err
		}
		consolePage[row.ID] = page
	}
	rep.Rebase(dir)
	v := view{Report: &rep, Stages: Stages(), Colors: stageColor}
	maxT := 1.0
	for _, row := range rep.Rows {
		maxT = max(maxT, row.Verdict.ElapsedSeconds)
		for _, sp := range row.Spans {
			maxT = max(maxT, sp.StartSeconds+sp.Seconds)
		}
	}
	v.Scale = barWidth / maxT
	filters := map[string]map[string]bool{"arch": {}, "chain": {}, "root": {}, "network": {}}
	for _, row := range rep.Rows {
		rv := rowView{Row: row, ConsolePage: consolePage[row.ID]}
		// Links only to files that are there.
		for _, p := range rv.Artifacts.paths() {
			if *p != "" {
				if _, err := os.Stat(filepath.Join(dir, *p)); err != nil {
					*p = ""
				}
			}
		}
		rv.Bars = bars(row, v.Scale)
		v.Rows = append(v.Rows, rv)
		if row.Pass {
			v.Passed++
		} else {
			v.Failed++
		}
		filters["arch"][row.Arch] = true
		filters["chain"][row.Chain] = true
		filters["root"][row.Root] = true
		filters["network"][row.Network] = true
	}
	for _, k := range []string{"arch", "chain", "root", "network"} {
		var vals []string
		for val := range filters[k] {
			vals = append(vals, val)
		}
		sort.Strings(vals)
		v.Filters = append(v.Filters, filter{Name: k, Values: vals})
	}
	v.Filters = append(v.Filters, filter{Name: "outcome", Values: []string{"pass", "fail"}})
	v.Chart = chainChart(rep.Rows)
	v.Versions = versions(&rep)
	f, err := os.Create(filepath.Join(dir, "index.html"))
	if err != nil {
		return err
	}
	if err := indexTmpl.Execute(f, v); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

const barWidth = 420.0 // pixels for the longest boot

type view struct {
	*Report
	Rows           []rowView
	Passed, Failed int
	Scale          float64
	Stages         []string
	Colors         map[string]string
	Filters        []filter
	Chart          []chartRow
	Versions       []string
}

type filter struct {
	Name   string
	Values []string
}

type rowView struct {
	Row
	ConsolePage string
	Bars        []bar
}

// bar is one stage drawn to scale.
type bar struct {
	Stage                 string
	X, W, Deadline        float64
	Seconds, DeadlineSecs float64
	Failed                bool
	Color                 string
}

// bars draws a row's stages. Each stage's deadline is in its tooltip; the
// stage the boot ended in also has its deadline drawn, the one that could
// have ended it (every stage's tick at once only clutters the row).
func bars(row Row, scale float64) []bar {
	var out []bar
	for i, sp := range row.Spans {
		b := bar{Stage: sp.Stage, X: sp.StartSeconds * scale, W: max(sp.Seconds*scale, 1),
			Seconds: sp.Seconds, DeadlineSecs: sp.DeadlineSeconds, Color: stageColor[sp.Stage]}
		if sp.DeadlineSeconds > 0 && i == len(row.Spans)-1 {
			b.Deadline = (sp.StartSeconds + sp.DeadlineSeconds) * scale
		}
		b.Failed = !row.Verdict.OK && sp.Stage == row.Verdict.Stage
		out = append(out, b)
	}
	return out
}

// chartRow is where a chain's boot time goes: the mean of each stage over
// its rows that reached the marker.
type chartRow struct {
	Chain string
	N     int
	Total float64
	Parts []chartPart
}

type chartPart struct {
	Stage   string
	Seconds float64
	X, W    float64
	Color   string
}

func chainChart(rows []Row) []chartRow {
	sums := map[string]map[string]float64{}
	count := map[string]int{}
	for _, row := range rows {
		if !row.Verdict.OK {
			continue
		}
		if sums[row.Chain] == nil {
			sums[row.Chain] = map[string]float64{}
		}
		count[row.Chain]++
		for _, sp := range row.Spans {
			sums[row.Chain][sp.Stage] += sp.Seconds
		}
	}
	var chains []string
	for c := range sums {
		chains = append(chains, c)
	}
	sort.Strings(chains)
	var out []chartRow
	maxTotal := 1.0
	for _, c := range chains {
		cr := chartRow{Chain: c, N: count[c]}
		for _, st := range Stages() {
			if s, ok := sums[c][st]; ok {
				m := s / float64(count[c])
				cr.Parts = append(cr.Parts, chartPart{Stage: st, Seconds: m, Color: stageColor[st]})
				cr.Total += m
			}
		}
		maxTotal = max(maxTotal, cr.Total)
		out = append(out, cr)
	}
	for i := range out {
		x := 0.0
		for j := range out[i].Parts {
			p := &out[i].Parts[j]
			p.X = x
			p.W = p.Seconds / maxTotal * barWidth
			x += p.W
		}
	}
	return out
}

func versions(r *Report) []string {
	var out []string
	out = append(out, "nbh "+r.NBH)
	var keys []string
	for k := range r.QEMU {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		out = append(out, k+": "+r.QEMU[k]+accelNote(r.Accel[k]))
	}
	keys = keys[:0]
	for k := range r.Pins {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		out = append(out, k+" pins: "+strings.Join(r.Pins[k], ", "))
	}
	return out
}

func accelNote(a string) string {
	if a == "" {
		return ""
	}
	return " (" + a + ")"
}

// writeConsolePage renders a console.log as a page with numbered, anchored
// lines (#L12) and the deciding line highlighted.
func writeConsolePage(path string, row Row) error {
	f, err := os.Open(row.Artifacts.Console)
	if err != nil {
		return err
	}
	defer f.Close()
	type line struct {
		N    int
		Text string
		Hit  bool
	}
	var lines []line
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for n := 1; sc.Scan(); n++ {
		lines = append(lines, line{N: n, Text: strings.ToValidUTF8(sc.Text(), "\uFFFD"), Hit: n == row.Verdict.ConsoleLine})
	}
	out, err := os.Create(path)
	if err != nil {
		return err
	}
	err = consoleTmpl.Execute(out, map[string]any{"Row": row, "Lines": lines})
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

var funcs = template.FuncMap{
	"secs": func(f float64) string { return fmt.Sprintf("%.1fs", f) },
	"px":   func(f float64) string { return fmt.Sprintf("%.1f", f) },
}

var indexTmpl = template.Must(template.New("index").Funcs(funcs).Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>nbh matrix: {{.Passed}} of {{len .Rows}} passed</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}
.totals{font-size:1.1em;margin:.3em 0 1em}
td.pass,span.pass{color:#1b7a3a;font-weight:bold}td.fail,span.fail{color:#b3261e;font-weight:bold}
td.links,td.chain{white-space:nowrap}td.links{font-size:.9em}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 6px;border-bottom:1px solid #e4e4e4;vertical-align:top}
tr.row.fail{background:#fdecea}
tr.detail td{background:#fafafa;font-size:.92em}
tr.detail pre{margin:.3em 0;white-space:pre-wrap;max-height:14em;overflow:auto}
.filters label{margin-right:1em}
.versions{color:#555;font-size:.85em}
.legend span{display:inline-block;margin-right:1em}
.legend i{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:middle}
svg text{font-size:11px}
a{color:#1a57a8}
</style></head><body>
<h1>nbh matrix</h1>
<div class="totals" id="totals"><b>{{len .Rows}}</b> rows: <span class="pass"><b id="passed">{{.Passed}}</b> passed</span>, <span class="fail"><b id="failed">{{.Failed}}</b> failed</span>{{range .Runs}} · {{.Host}}{{if .Shard}} shard {{.Shard}}{{end}}: -j {{.Jobs}}, {{secs .WallSeconds}} wall{{end}} · generated {{.Generated.Format "2006-01-02 15:04:05 MST"}}</div>
<div class="versions">{{range .Versions}}<div>{{.}}</div>{{end}}</div>

<h2>Where boot time goes</h2>
<p class="legend">{{range $.Stages}}<span><i style="background:{{index $.Colors .}}"></i>{{.}}</span>{{end}} (mean per stage over each chain's rows that reached the marker)</p>
<table id="chain-chart">{{range .Chart}}
<tr><td>{{.Chain}}</td><td>{{.N}} boots</td><td>{{secs .Total}}</td><td><svg width="440" height="16" role="img" aria-label="{{.Chain}}">{{range .Parts}}<rect x="{{px .X}}" y="2" width="{{px .W}}" height="12" fill="{{.Color}}"><title>{{.Stage}} {{secs .Seconds}}</title></rect>{{end}}</svg></td></tr>{{end}}
</table>

<h2>Boots</h2>
<div class="filters" id="filters">{{range .Filters}}<label>{{.Name}} <select data-filter="{{.Name}}"><option value="">all</option>{{range .Values}}<option>{{.}}</option>{{end}}</select></label>{{end}} <span id="shown"></span></div>
<table id="rows">
<thead><tr><th></th><th>chain</th><th>root</th><th>network</th><th>fault</th><th>expected</th><th>outcome</th><th>time</th><th>stages (to scale; dashed: the last stage's deadline)</th><th>artifacts</th></tr></thead>
<tbody>{{range .Rows}}
<tr class="row {{if .Pass}}pass{{else}}fail{{end}}" id="row-{{.ID}}" data-arch="{{.Arch}}" data-chain="{{.Chain}}" data-root="{{.Root}}" data-network="{{.Network}}" data-outcome="{{if .Pass}}pass{{else}}fail{{end}}">
<td class="{{if .Pass}}pass{{else}}fail{{end}}">{{if .Pass}}PASS{{else}}FAIL{{end}}</td>
<td class="chain">{{.Chain}}</td><td>{{.Root}}</td><td>{{.Network}}</td><td>{{or .Fault "-"}}</td><td>{{.Expect}}</td><td>{{.Outcome}}</td><td>{{secs .Verdict.ElapsedSeconds}}</td>
<td><svg width="440" height="18" role="img" aria-label="stages of {{.ID}}">{{range .Bars}}<rect class="stage{{if .Failed}} failed-stage{{end}}" x="{{px .X}}" y="3" width="{{px .W}}" height="12" fill="{{.Color}}"{{if .Failed}} stroke="#b3261e" stroke-width="2"{{end}}><title>{{.Stage}} {{secs .Seconds}}{{if .DeadlineSecs}} (deadline {{secs .DeadlineSecs}}){{end}}{{if .Failed}}: failed here{{end}}</title></rect>{{if and .Deadline (le .Deadline 440.0)}}<line class="deadline" x1="{{px .Deadline}}" x2="{{px .Deadline}}" y1="0" y2="18" stroke="{{if .Failed}}#b3261e{{else}}#555{{end}}" stroke-width="1.5" stroke-dasharray="3,2"><title>{{.Stage}} deadline {{secs .DeadlineSecs}}</title></line>{{end}}{{end}}</svg></td>
<td class="links">{{if .ConsolePage}}<a class="console" href="{{.ConsolePage}}{{if .Verdict.ConsoleLine}}#L{{.Verdict.ConsoleLine}}{{end}}">console</a> {{end}}{{if .Artifacts.Console}}<a href="{{.Artifacts.Console}}" title="console.log">log</a> {{end}}{{if .Artifacts.Timeline}}<a href="{{.Artifacts.Timeline}}" title="timeline.jsonl">timeline</a> {{end}}{{if .Artifacts.Network}}<a href="{{.Artifacts.Network}}" title="network.pcapng">pcap</a>{{end}}{{if and .Artifacts.Bundle (not .Pass)}}<div class="repro" title="the path is from this page's folder">reproduce: <code>nbh repro {{.Artifacts.Bundle}}</code></div>{{end}}</td>
</tr>{{if or (not .Pass) .Verdict.Warnings}}
<tr class="detail" data-for="row-{{.ID}}"><td></td><td colspan="9">
{{if .Error}}<div><b>error:</b> {{.Error}}</div>{{end}}
{{if .Verdict.Reason}}<div><b>{{.Verdict.Reason}}</b> at stage <b>{{.Verdict.Stage}}</b> after {{secs .Verdict.ElapsedSeconds}}</div>{{end}}
{{if .Verdict.Line}}<div>decided by: <code>{{.Verdict.Line}}</code></div>{{end}}
{{if .Verdict.Detail}}<div>evidence: {{.Verdict.Detail}}</div>{{end}}
{{range .Verdict.Warnings}}<div class="warning">warning: {{.}}</div>{{end}}
{{if .Verdict.Tail}}<pre>{{range .Verdict.Tail}}{{.}}
{{end}}</pre>{{end}}
</td></tr>{{end}}{{end}}
</tbody></table>
<script>
(function(){
  var sel = document.querySelectorAll('#filters select');
  function apply(){
    var want = {}, parts = [];
    sel.forEach(function(s){ if (s.value) { want[s.dataset.filter] = s.value; parts.push(s.dataset.filter + '=' + encodeURIComponent(s.value)); } });
    var shown = 0;
    document.querySelectorAll('#rows tr.row').forEach(function(tr){
      var ok = true;
      for (var k in want) if (tr.dataset[k] !== want[k]) ok = false;
      tr.hidden = !ok;
      if (ok) shown++;
      var d = document.querySelector('tr.detail[data-for="' + tr.id + '"]');
      if (d) d.hidden = !ok;
    });
    document.getElementById('shown').textContent = shown + ' shown';
    if (history.replaceState) history.replaceState(null, '', parts.length ? '#' + parts.join('&') : location.pathname);
  }
  // Filters can come in the address: index.html#outcome=fail&arch=arm64
  location.hash.slice(1).split('&').forEach(function(kv){
    var p = kv.split('='); if (p.length !== 2) return;
    sel.forEach(function(s){ if (s.dataset.filter === p[0]) s.value = decodeURIComponent(p[1]); });
  });
  sel.forEach(function(s){ s.addEventListener('change', apply); });
  apply();
})();
</script>
</body></html>
`))

var consoleTmpl = template.Must(template.New("console").Funcs(funcs).Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>console: {{.Row.ID}}</title>
<style>
body{font:13px/1.35 ui-monospace,monospace;margin:1em}
.l{white-space:pre-wrap;display:block}
.l a{color:#999;text-decoration:none;display:inline-block;width:4.5em;user-select:none}
.hl{background:#ffe08a;font-weight:bold}
:target{outline:2px solid #b3261e}
</style></head><body>
<p><b>{{.Row.Chain}} {{.Row.CaseName}}</b>: {{.Row.Outcome}}{{if .Row.Verdict.ConsoleLine}} — <a href="#L{{.Row.Verdict.ConsoleLine}}">the deciding line ({{.Row.Verdict.ConsoleLine}})</a>{{end}}</p>
{{range .Lines}}<span class="l{{if .Hit}} hl{{end}}" id="L{{.N}}"><a href="#L{{.N}}">{{.N}}</a>{{.Text}}</span>
{{end}}</body></html>
`))
