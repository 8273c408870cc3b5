package scenarios

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"
	"gotest.tools/v3/poll"
)

// tmuxPane is a terminal a person would use: a detached tmux session on a
// private server, driven with send-keys and read with capture-pane.
type tmuxPane struct {
	t    *testing.T
	sock string
}

func newTmux(t *testing.T, command string) *tmuxPane {
	t.Helper()
	if _, err := exec.LookPath("tmux"); err != nil {
		t.Fatal("tmux not found (Debian package tmux; make setup installs it)")
	}
	dir := t.TempDir()
	p := &tmuxPane{t: t, sock: filepath.Join(dir, "tmux.sock")}
	// The command goes in a script: on tmux's own command line it would
	// count as a process using the test's folders.
	script := filepath.Join(dir, "run.sh")
	assert.NilError(t, os.WriteFile(script, []byte(command+"\n"), 0o755))
	p.run("new-session", "-d", "-x", "160", "-y", "50", "sh "+script)
	t.Cleanup(func() { exec.Command("tmux", "-S", p.sock, "kill-server").Run() })
	return p
}

func (p *tmuxPane) run(args ...string) string {
	p.t.Helper()
	out, err := exec.Command("tmux", append([]string{"-S", p.sock}, args...)...).CombinedOutput()
	assert.NilError(p.t, err, "tmux %s: %s", strings.Join(args, " "), out)
	return string(out)
}

// screen is the pane's text with its scrollback.
func (p *tmuxPane) screen() string { return p.run("capture-pane", "-p", "-J", "-S", "-2000") }

func (p *tmuxPane) waitFor(what string, timeout time.Duration) {
	p.t.Helper()
	poll.WaitOn(p.t, func(poll.LogT) poll.Result {
		if strings.Contains(p.screen(), what) {
			return poll.Success()
		}
		return poll.Continue("no %q on the screen yet", what)
	}, poll.WithTimeout(timeout), poll.WithDelay(500*time.Millisecond))
}

// TestInteractiveConsoleInTmux is nbh boot --interactive as a person uses
// it: a boot that fails gives the reference init's shell on the terminal; a
// command typed there runs in the guest and its answer comes back; Ctrl-] q
// quits, the verdict and the exit status are the failed boot's, and nothing
// is left running.
func TestInteractiveConsoleInTmux(t *testing.T) {
	guestTest(t)
	if !selected("amd64", "direct") {
		t.Skip("amd64/direct not selected")
	}
	bin := buildNBH(t)
	tmp := t.TempDir()
	art := filepath.Join(t.TempDir(), "art")
	pane := newTmux(t, "env TMPDIR="+tmp+" "+bin+" boot --interactive --arch amd64 --firmware direct --fault module-skew --artifacts "+art+
		"; echo NBH-EXIT=$?; echo TTY-$(stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon); sleep 600")
	pane.waitFor("Ctrl-] q quits", 30*time.Second)
	pane.waitFor("nbh# ", 180*time.Second)
	scr := pane.screen()
	// Timeline events came as they happened, the verdict when it fell.
	assert.Check(t, is.Contains(scr, "] console failure: nbh-init: FAIL archive"))
	assert.Check(t, is.Contains(scr, "nbh: FAILED: stale boot archive at stage init"))
	assert.Check(t, is.Contains(scr, "the lab keeps serving"))

	pane.run("send-keys", "echo answer-$((6*7)); cat /proc/cmdline", "Enter")
	pane.waitFor("answer-42", 30*time.Second)
	assert.Check(t, is.Contains(pane.screen(), "panic=-1"), "the guest's own command line")
	assert.Check(t, len(processesUsing(tmp)) > 0, "QEMU stopped before the user quit")

	pane.run("send-keys", "C-]", "q")
	pane.waitFor("NBH-EXIT=", 60*time.Second)
	scr = pane.screen()
	assert.Check(t, is.Contains(scr, "NBH-EXIT=1"))
	assert.Check(t, is.Contains(scr, "reproduce: nbh repro "+art))
	// The terminal is back in cooked mode.
	pane.waitFor("TTY-", 10*time.Second)
	assert.Check(t, is.Contains(pane.screen(), "TTY-icanon"))
	assert.Check(t, is.Len(processesUsing(tmp), 0), "left running")
	assert.Check(t, is.Len(leftovers(tmp), 0), "left behind")
	_, err := os.Stat(filepath.Join(art, "spec.json"))
	assert.Check(t, err == nil, "no bundle: %v", err)
}
