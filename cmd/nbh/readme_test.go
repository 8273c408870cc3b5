package main

import (
	"fmt"
	"os"
	"strings"
	"testing"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/images"
)

// chainTable is the README's chain table, made from the chain table that
// --help lists: a chain declared once, documented from its declaration.
func chainTable() string {
	var b strings.Builder
	b.WriteString("| arch  | `--firmware`   | chain |\n|-------|----------------|-------|\n")
	both := map[string]int{}
	for _, c := range harness.AllChains() {
		both[c.Firmware+"\x00"+c.Description]++
	}
	done := map[string]bool{}
	for _, c := range harness.AllChains() {
		key := c.Firmware + "\x00" + c.Description
		arch := c.Arch
		if both[key] > 1 {
			if done[key] {
				continue
			}
			done[key], arch = true, "both"
			if both[key] == len(images.Arches()) {
				arch = "all"
			}
		}
		fmt.Fprintf(&b, "| %-5s | %-14s | %s |\n", arch, "`"+c.Firmware+"`", c.Description)
	}
	return b.String()
}

// TestREADMEChainTable: the README lists exactly the declared chains, in
// their words (NBH_WRITE_README=1 writes the table into it).
func TestREADMEChainTable(t *testing.T) {
	want := chainTable()
	readme, err := os.ReadFile("../../README.md")
	assert.NilError(t, err)
	if os.Getenv("NBH_WRITE_README") != "" {
		head, rest, ok := strings.Cut(string(readme), "| arch  | `--firmware`   | chain |\n")
		assert.Assert(t, ok, "README.md has no chain table")
		_, tail, _ := strings.Cut(rest, "\n\n")
		readme = []byte(head + want + "\n" + tail)
		assert.NilError(t, os.WriteFile("../../README.md", readme, 0o644))
	}
	assert.Assert(t, strings.Contains(string(readme), want), "README.md's chain table differs from the chain table (NBH_WRITE_README=1 writes it); want:\n%s", want)
}
