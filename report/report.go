// Package report is the record of a matrix run and its renderings: the JSON
// report (the stable, machine-readable form that shards write and that
// merges), JUnit for CI systems, and one self-contained HTML page. Each is
// a rendering of the same Report; nothing here reads a console log twice to
// decide anything.
package report

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"
)

// Format is the JSON report's format version; readers refuse others.
const Format = 1

// Report is one matrix run (or several merged).
type Report struct {
	Format    int       `json:"format"`
	Generated time.Time `json:"generated"`
	// Versions that made it: nbh, QEMU per architecture, the pinned
	// packages per architecture ("name version").
	NBH   string              `json:"nbh"`
	QEMU  map[string]string   `json:"qemu,omitempty"`
	Accel map[string]string   `json:"accel,omitempty"` // per guest arch: kvm or tcg, and why
	Pins  map[string][]string `json:"pins,omitempty"`
	// Runs are the invocations merged here (one per shard).
	Runs []Run `json:"runs"`
	Rows []Row `json:"rows"`
}

// Run is one invocation of the matrix.
type Run struct {
	Host        string  `json:"host"`
	Shard       string  `json:"shard,omitempty"` // "I/N"
	Jobs        int     `json:"jobs"`
	WallSeconds float64 `json:"wall_seconds"`
}

// Row is one boot.
type Row struct {
	ID       string `json:"id"`
	Arch     string `json:"arch"`
	Firmware string `json:"firmware"`
	Chain    string `json:"chain"` // ARCH/FIRMWARE
	Root     string `json:"root"`  // none, nfs, iscsi
	Network  string `json:"network"`
	Fault    string `json:"fault,omitempty"`
	Expect   string `json:"expect"` // "marker" or the fault's reason
	Pass     bool   `json:"pass"`
	// Outcome is "marker", "REASON at STAGE", or "error: …".
	Outcome string  `json:"outcome"`
	Verdict Verdict `json:"verdict"`
	Error   string  `json:"error,omitempty"`
	Spans   []Span  `json:"spans"`
	// WallSeconds is the whole row: lab set-up, boot and clean-up.
	WallSeconds float64 `json:"wall_seconds"`
	// Start is how the row's machine started in a matrix with warm starts
	// (nbh matrix --warm): "warm: …", "saved: …" or "cold: why".
	Start string `json:"start,omitempty"`
	// Artifacts are paths relative to the report file's folder; empty
	// when not kept.
	Artifacts Artifacts `json:"artifacts"`
}

// Verdict is how the boot ended.
type Verdict struct {
	OK             bool     `json:"ok"`
	Reason         string   `json:"reason,omitempty"`
	Stage          string   `json:"stage"`
	Line           string   `json:"line,omitempty"`         // the console line that decided
	ConsoleLine    int      `json:"console_line,omitempty"` // its line number in console.log (1-based)
	Detail         string   `json:"detail,omitempty"`       // the server side's evidence
	ElapsedSeconds float64  `json:"elapsed_seconds"`
	Tail           []string `json:"tail,omitempty"` // last console lines
	// Warnings are what went wrong without failing the boot (a stale
	// archive the server found).
	Warnings []string `json:"warnings,omitempty"`
}

// Span is one stage of the boot.
type Span struct {
	Stage           string  `json:"stage"`
	StartSeconds    float64 `json:"start_seconds"` // since QEMU started
	Seconds         float64 `json:"seconds"`
	DeadlineSeconds float64 `json:"deadline_seconds,omitempty"`
}

// Artifacts of one row.
type Artifacts struct {
	Console  string `json:"console,omitempty"`
	Timeline string `json:"timeline,omitempty"`
	Network  string `json:"network,omitempty"`
	// Bundle is the row's repro bundle (its artifacts folder, when it
	// holds one): nbh repro BUNDLE replays the boot.
	Bundle string `json:"bundle,omitempty"`
}

// Failed counts the rows that did not pass.
func (r *Report) Failed() int {
	n := 0
	for _, row := range r.Rows {
		if !row.Pass {
			n++
		}
	}
	return n
}

// WriteJSON writes r to path.
func (r *Report) WriteJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// ReadJSON reads a report and makes its artifact paths relative to the
// current folder (they are stored relative to the report's own folder).
func ReadJSON(path string) (*Report, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r Report
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if r.Format != Format {
		return nil, fmt.Errorf("%s: report format %d, this nbh reads %d", path, r.Format, Format)
	}
	r.Resolve(filepath.Dir(path))
	return &r, nil
}

// paths are the artifact paths of a row, to rewrite in place.
func (a *Artifacts) paths() []*string {
	return []*string{&a.Console, &a.Timeline, &a.Network, &a.Bundle}
}

// Resolve makes artifact paths stored relative to base (the folder of the
// JSON file) relative to the current folder; Rebase is its inverse.
func (r *Report) Resolve(base string) {
	for i := range r.Rows {
		for _, p := range r.Rows[i].Artifacts.paths() {
			if *p != "" && !filepath.IsAbs(*p) {
				*p = filepath.Join(base, *p)
			}
		}
	}
}

// Rebase makes every artifact path relative to dir (where a file that links
// to them is written); paths are taken relative to the current folder.
func (r *Report) Rebase(dir string) {
	for i := range r.Rows {
		for _, p := range r.Rows[i].Artifacts.paths() {
			if *p != "" {
				*p = RelativeTo(dir, *p)
			}
		}
	}
}

// RelativeTo is path p as seen from folder dir (p itself when it cannot be
// made relative).
func RelativeTo(dir, p string) string {
	absDir, err1 := filepath.Abs(dir)
	abs, err2 := filepath.Abs(p)
	if err1 != nil || err2 != nil {
		return p
	}
	if rel, err := filepath.Rel(absDir, abs); err == nil {
		return rel
	}
	return p
}

// Merge combines reports (the shards of one CI run) into one: rows in
// order of chain and ID, runs and versions together. A row ID present in
// two reports is an error: shards never share rows.
func Merge(reports ...*Report) (*Report, error) {
	out := &Report{Format: Format, QEMU: map[string]string{}, Accel: map[string]string{}, Pins: map[string][]string{}}
	seen := map[string]bool{}
	for _, r := range reports {
		if r.Generated.After(out.Generated) {
			out.Generated = r.Generated
		}
		if out.NBH == "" {
			out.NBH = r.NBH
		} else if r.NBH != out.NBH {
			out.NBH += ", " + r.NBH
		}
		for k, v := range r.QEMU {
			out.QEMU[k] = v
		}
		for k, v := range r.Accel {
			out.Accel[k] = v
		}
		for k, v := range r.Pins {
			out.Pins[k] = v
		}
		out.Runs = append(out.Runs, r.Runs...)
		for _, row := range r.Rows {
			if seen[row.ID] {
				return nil, fmt.Errorf("row %s is in two reports", row.ID)
			}
			seen[row.ID] = true
			out.Rows = append(out.Rows, row)
		}
	}
	sort.SliceStable(out.Rows, func(i, j int) bool {
		if out.Rows[i].Chain != out.Rows[j].Chain {
			return out.Rows[i].Chain < out.Rows[j].Chain
		}
		return out.Rows[i].ID < out.Rows[j].ID
	})
	return out, nil
}
