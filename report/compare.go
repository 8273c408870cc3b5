package report

import (
	"fmt"
	"io"
	"sort"
)

// Pair is one row in two runs of the matrix (a cold and a warm one).
type Pair struct {
	ID     string
	A, B   *Row // nil where the run has no such row
	Differ bool // not the same outcome (pass and verdict), or a row of one run only
}

// Comparison is two runs row by row.
type Comparison struct {
	Pairs        []Pair
	Differ       int     // pairs that differ
	WallA, WallB float64 // the runs' wall times (sums over their invocations)
	RowsA, RowsB float64 // the rows' own times summed (lab set-up, boot, clean-up)
}

// Compare pairs the rows of a and b by ID: the same outcome means the same
// pass or fail and the same verdict (the marker, or the same reason at the
// same stage).
func Compare(a, b *Report) Comparison {
	var c Comparison
	for _, r := range a.Runs {
		c.WallA += r.WallSeconds
	}
	for _, r := range b.Runs {
		c.WallB += r.WallSeconds
	}
	byID := map[string]*Pair{}
	var ids []string
	for _, side := range []struct {
		rows []Row
		a    bool
	}{{a.Rows, true}, {b.Rows, false}} {
		for i := range side.rows {
			r := &side.rows[i]
			p := byID[r.ID]
			if p == nil {
				p = &Pair{ID: r.ID}
				byID[r.ID] = p
				ids = append(ids, r.ID)
			}
			if side.a {
				p.A = r
				c.RowsA += r.WallSeconds
			} else {
				p.B = r
				c.RowsB += r.WallSeconds
			}
		}
	}
	sort.Strings(ids)
	for _, id := range ids {
		p := *byID[id]
		p.Differ = p.A == nil || p.B == nil || p.A.Pass != p.B.Pass || p.A.Outcome != p.B.Outcome
		if p.Differ {
			c.Differ++
		}
		c.Pairs = append(c.Pairs, p)
	}
	return c
}

// Write prints the comparison: a line per row (its outcome in each run,
// each run's time for it and the share of it the second run saved), then
// the totals.
func (c Comparison) Write(w io.Writer, nameA, nameB string) {
	width := len("row")
	for _, p := range c.Pairs {
		width = max(width, len(p.ID))
	}
	fmt.Fprintf(w, "%-*s  %-6s %-30s %8s %8s %7s  %s\n", width, "row", "", "outcome", nameA, nameB, "saved", "start ("+nameB+")")
	outcome := func(r *Row) string {
		if r == nil {
			return "(not run)"
		}
		return r.Outcome
	}
	for _, p := range c.Pairs {
		same := "same"
		if p.Differ {
			same = "DIFFER"
		}
		o := outcome(p.A)
		if p.Differ {
			o = outcome(p.A) + " | " + outcome(p.B)
		}
		var wa, wb, saved string
		if p.A != nil {
			wa = fmt.Sprintf("%.1fs", p.A.WallSeconds)
		}
		if p.B != nil {
			wb = fmt.Sprintf("%.1fs", p.B.WallSeconds)
		}
		start := ""
		if p.B != nil {
			start = p.B.Start
			if len(start) > 60 {
				start = start[:60] + "…"
			}
		}
		if p.A != nil && p.B != nil && p.A.WallSeconds > 0 {
			saved = fmt.Sprintf("%.0f%%", 100*(p.A.WallSeconds-p.B.WallSeconds)/p.A.WallSeconds)
		}
		fmt.Fprintf(w, "%-*s  %-6s %-30s %8s %8s %7s  %s\n", width, p.ID, same, o, wa, wb, saved, start)
	}
	fmt.Fprintf(w, "\n%d rows, %d with the same outcome, %d differ\n", len(c.Pairs), len(c.Pairs)-c.Differ, c.Differ)
	if c.RowsA > 0 {
		fmt.Fprintf(w, "rows' own time: %s %.0fs, %s %.0fs (%.0f%% saved)\n", nameA, c.RowsA, nameB, c.RowsB, 100*(c.RowsA-c.RowsB)/c.RowsA)
	}
	if c.WallA > 0 {
		fmt.Fprintf(w, "wall time: %s %.0fs, %s %.0fs (%.0f%% saved)\n", nameA, c.WallA, nameB, c.WallB, 100*(c.WallA-c.WallB)/c.WallA)
	}
}
