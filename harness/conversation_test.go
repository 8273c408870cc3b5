package harness

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/console"
)

// consoleLines is what Run reads of a guest's raw output: lines, as
// console.Plain has them.
func consoleLines(raw string) []string {
	var out []string
	for _, l := range strings.SplitAfter(raw, "\n") {
		if c := console.Plain(l); strings.TrimSpace(c) != "" {
			out = append(out, c)
		}
	}
	return out
}

// runInShell runs Run's script in a real shell (the host's sh, with od, sed
// and sha256sum: what a guest's shell has) and returns its raw output after
// the terminal's echo of the typed text, as a console would show both.
func runInShell(t *testing.T, n, cmd string) string {
	t.Helper()
	script := runScript(n, cmd)
	out, err := exec.Command("sh", "-c", script).CombinedOutput()
	assert.NilError(t, err, "%s", out)
	return script + string(out) // the echo comes first
}

// parseRunAll is parseRun with a Run's whole repair budget.
func parseRunAll(n string, lines []string) (string, int, error) {
	budget := repairBudget
	return parseRun(n, lines, &budget)
}

// frameOf writes a frame as the guest's awk does: the wire format.
func frameOf(n string, ch byte, line int, data []byte) string {
	f := fmt.Sprintf("%s:%c %d", n, ch, line)
	sum := len(data)
	for _, b := range data {
		f += fmt.Sprintf(" %d", b)
		sum = (sum*257 + int(b)) % 2147483647
	}
	return f + fmt.Sprintf(" =%d;", sum)
}

// TestRunFraming: Run gets exactly what the command wrote and its status
// out of a console that also shows the typed text and kernel messages
// breaking in anywhere, and says so when the output arrived garbled rather
// than returning a wrong answer. The oracle is the command's output as the
// same shell writes it to a pipe.
func TestRunFraming(t *testing.T) {
	cmds := []struct {
		cmd    string
		status int
	}{
		{"echo hello", 0},
		{"printf 'no newline at the end'", 0},
		{"false", 1},
		{"exit_with() { return $1; }; exit_with 7", 7},
		{`printf '\001\377\r\n\t x'`, 0},
		{"echo to stderr >&2; echo to stdout", 0},
		{"echo 0123456789ab:o 0 1 =2; echo NBH-RUN-0123456789ab-1-DONE", 0}, // a command printing frame- and marker-like lines
		{"seq 1 3000", 0},
		{"printf ''", 0},
		{"echo one\necho two", 0},
	}
	const n = "0123456789ab"
	kernel := []string{"[   12.345678] nfs: server 10.0.2.2 not responding, still trying\r\n",
		"[  OK  ] Started some.service.\r\n", "e1000 0000:00:03.0 eth0: link up\r\n"}
	r := rand.New(rand.NewPCG(1, 2))
	for _, c := range cmds {
		want, _ := exec.Command("sh", "-c", c.cmd).CombinedOutput()
		raw := runInShell(t, n, c.cmd)
		raw = strings.ReplaceAll(raw, "\n", "\r\n") // the terminal's onlcr

		out, status, err := parseRunAll(n, consoleLines(raw))
		assert.NilError(t, err, "%q", c.cmd)
		assert.Equal(t, out, string(want), "%q", c.cmd)
		assert.Equal(t, status, c.status, "%q", c.cmd)

		// Messages broken in at random places of the guest's output
		// (after the echo), a few at a time.
		echo := len(runScript(n, c.cmd)) + strings.Count(runScript(n, c.cmd), "\n")
		for range 30 {
			var at []int
			for range 3 {
				at = append(at, echo+r.IntN(len(raw)-echo))
			}
			slices.Sort(at)
			var mixed strings.Builder
			prev := 0
			for _, i := range at {
				mixed.WriteString(raw[prev:i])
				mixed.WriteString(kernel[r.IntN(len(kernel))])
				prev = i
			}
			mixed.WriteString(raw[prev:])
			out, status, err := parseRunAll(n, consoleLines(mixed.String()))
			assert.NilError(t, err, "%q in %q", c.cmd, mixed.String())
			assert.Equal(t, out, string(want), "%q", c.cmd)
			assert.Equal(t, status, c.status)
		}
	}

	// A changed byte is an error, not a wrong answer.
	raw := strings.ReplaceAll(runInShell(t, n, "echo hello"), "\n", "\r\n")
	garbled := strings.Replace(raw, n+":o 0 104", n+":o 0 105", 1)
	assert.Assert(t, garbled != raw)
	_, _, err := parseRunAll(n, consoleLines(garbled))
	assert.ErrorContains(t, err, "the guest counted")
	// A frame replaced by another with a good checksum but other bytes
	// (what no per-line check can catch): the SHA-256 does.
	forged := strings.Replace(raw, frameOf(n, 'o', 0, []byte("hello\n")), frameOf(n, 'o', 0, []byte("jello\n")), 1)
	assert.Assert(t, forged != raw, "the test's frame is not the guest's")
	_, _, err = parseRunAll(n, consoleLines(forged))
	assert.ErrorContains(t, err, "SHA-256")
	// A lost frame too.
	lost := strings.Replace(raw, n+":o 0", "x:o 0", 1)
	_, _, err = parseRunAll(n, consoleLines(lost))
	assert.ErrorContains(t, err, "the guest counted")
	// No place to write the output: said so.
	nowhere, _ := exec.Command("sh", "-c", strings.ReplaceAll(runScript(n, "true"), runTmpDirs, "/nonexistent /proc")).CombinedOutput()
	_, _, err = parseRunAll(n, consoleLines(string(nowhere)))
	assert.ErrorContains(t, err, "can write none")
	// A $TMPDIR it cannot write: the next folder.
	cmd := exec.Command("sh", "-c", runScript(n, "echo fallback"))
	cmd.Env = append(os.Environ(), "TMPDIR=/nonexistent")
	b, err := cmd.CombinedOutput()
	assert.NilError(t, err)
	out, _, err := parseRunAll(n, consoleLines(string(b)))
	assert.NilError(t, err)
	assert.Equal(t, out, "fallback\n")
}

// TestRunFullFolder: a folder that fills up while the command writes cuts
// the kept output short, and the short copy's size and SHA-256 agree with
// each other: Run must say so instead of returning it. The folder is a real
// one-page tmpfs in a private mount namespace (root and unshare needed).
func TestRunFullFolder(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("no unshare")
	}
	n := "full"
	cmd := "head -c 20000 /dev/zero | tr '\\0' y" // 5 pages of output into a 1-page folder
	dir := t.TempDir()
	shell := "mount -t tmpfs -o size=4k nbh-full " + dir + " && TMPDIR=" + dir + " exec sh -c \"$1\""
	out, err := exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c", shell, "sh", runScript(n, cmd)).CombinedOutput()
	assert.NilError(t, err, "%s", out)
	_, _, err = parseRunAll(n, consoleLines(string(out)))
	assert.ErrorIs(t, err, errFull)

	// The same with room: the whole output.
	out, err = exec.Command("sh", "-c", runScript(n, cmd)).CombinedOutput()
	assert.NilError(t, err, "%s", out)
	got, status, err := parseRunAll(n, consoleLines(string(out)))
	assert.NilError(t, err)
	assert.Equal(t, status, 0)
	assert.Equal(t, got, strings.Repeat("y", 20000))
}

// TestRunRepairIsBounded: what a guest prints cannot make Run's repair
// of broken frames slow: a broken frame followed by console-long lines of
// the digits and spaces a frame is made of costs at most the budget (the
// test's own time limit is the backstop), and gives an error, not an
// answer.
func TestRunRepairIsBounded(t *testing.T) {
	const n = "0123456789ab"
	digits := strings.Repeat("1 ", console.MaxLine/2)
	lines := []string{n + ":o 0 104 101 1"}
	for range 6 {
		lines = append(lines, digits)
	}
	lines = append(lines, frameOf(n, 't', 0, []byte("0 3 "+strings.Repeat("a", 64)+"  -")))
	budget := repairBudget
	_, _, err := parseRun(n, lines, &budget)
	assert.Assert(t, err != nil)
	assert.Assert(t, budget >= 0, "read %d bytes past the budget", -budget)
}
