package main

import (
	"strings"
	"testing"

	"gotest.tools/v3/assert"
)

// TestJudgeFlatness: noise within the first boots' range is flat; a
// resource that grows with every boot is not, whichever it is.
func TestJudgeFlatness(t *testing.T) {
	steady := func(i int) footprint {
		return footprint{RSSMiB: 120 + float64(i%3), HeapMiB: 30 + float64(i%2), Goroutines: 40 + i%4, FDs: 20 + i%2, Events: 10, Subscribers: 2}
	}
	var s []footprint
	for i := range 100 {
		s = append(s, steady(i))
	}
	f := judge(s)
	assert.Equal(t, len(f.Growth), 0, "%v", f.Growth)

	leaks := map[string]func(*footprint, int){
		"goroutines":           func(p *footprint, i int) { p.Goroutines += i },
		"open files":           func(p *footprint, i int) { p.FDs += i / 10 },
		"RSS":                  func(p *footprint, i int) { p.RSSMiB += float64(i) / 2 },
		"heap in use":          func(p *footprint, i int) { p.HeapMiB += float64(i) / 4 },
		"timeline events":      func(p *footprint, i int) { p.Events += 200 * i },
		"timeline subscribers": func(p *footprint, i int) { p.Subscribers += i },
	}
	for what, leak := range leaks {
		var s []footprint
		for i := range 100 {
			p := steady(i)
			leak(&p, i)
			s = append(s, p)
		}
		f := judge(s)
		assert.Assert(t, len(f.Growth) == 1 && strings.HasPrefix(f.Growth[0], what), "%s: %v", what, f.Growth)
	}
}
