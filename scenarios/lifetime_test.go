package scenarios

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	"gotest.tools/v3/poll"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/qemu"
)

// processesUsing lists PIDs whose command line mentions dir (QEMU's QMP
// socket and per-guest files live in the lab folder under $TMPDIR).
func processesUsing(dir string) []string {
	var pids []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(b, []byte(dir)) {
			pids = append(pids, e.Name()+": "+strings.ReplaceAll(string(b), "\x00", " ")[:min(120, len(b))])
		}
	}
	return pids
}

func leftovers(dir string) []string {
	var out []string
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && p != dir && (strings.HasPrefix(filepath.Base(p), "nbh-lab-") || fi.Mode()&os.ModeSocket != 0) {
			out = append(out, p)
		}
		return nil
	})
	return out
}

// startUntilQEMU runs cmd with $TMPDIR=tmp and returns once the guest's QEMU
// has started (the "firmware" stage line on standard error).
func startUntilQEMU(t *testing.T, cmd *exec.Cmd, tmp string) {
	t.Helper()
	cmd.Env = append(append(os.Environ(), cmd.Env...), "TMPDIR="+tmp)
	stderr, err := cmd.StderrPipe()
	assert.NilError(t, err)
	assert.NilError(t, cmd.Start())
	started := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		once := false
		for sc.Scan() {
			if !once && strings.Contains(sc.Text(), "firmware") {
				once = true
				close(started)
			}
		}
	}()
	select {
	case <-started:
	case <-time.After(120 * time.Second):
		cmd.Process.Kill()
		t.Fatal("QEMU did not start within 120s")
	}
	assert.Assert(t, len(processesUsing(tmp)) > 0, "no QEMU found using %s", tmp)
}

func waitExit(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatal("process did not exit within 30s of the signal")
	}
}

func buildNBH(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "nbh")
	out, err := exec.Command("go", "build", "-o", bin, "nbh.dev/nbh/cmd/nbh").CombinedOutput()
	assert.NilError(t, err, "%s", out)
	return bin
}

// TestInterruptedCLILeavesNothing interrupts "nbh boot" mid-boot with
// SIGINT and SIGTERM: QEMU must be gone, and no lab folder or socket left.
func TestInterruptedCLILeavesNothing(t *testing.T) {
	needGuests(t)
	t.Parallel()
	bin := buildNBH(t)
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			guestTest(t)
			tmp := t.TempDir()
			cmd := exec.Command(bin, "boot", "--arch", "amd64", "--firmware", "direct", "--artifacts", filepath.Join(t.TempDir(), "art"))
			startUntilQEMU(t, cmd, tmp)
			assert.NilError(t, cmd.Process.Signal(sig))
			waitExit(t, cmd)
			assert.Equal(t, cmd.ProcessState.ExitCode(), 130)
			assert.DeepEqual(t, processesUsing(tmp), []string(nil))
			assert.DeepEqual(t, leftovers(tmp), []string(nil))
		})
	}
}

// TestKilledCLILeavesNoQEMU kills "nbh boot" outright: QEMU dies with it
// (parent-death signal), and the lab folder it could not remove is swept by
// the next lab.
func TestKilledCLILeavesNoQEMU(t *testing.T) {
	// Not parallel: it points TMPDIR, for the whole process, at the folder
	// the killed CLI left, so the next lab sweeps it. Sequential tests run
	// before the parallel ones start.
	needGuests(t)
	bin := buildNBH(t)
	tmp := t.TempDir()
	cmd := exec.Command(bin, "boot", "--arch", "amd64", "--firmware", "direct", "--artifacts", filepath.Join(t.TempDir(), "art"))
	startUntilQEMU(t, cmd, tmp)
	assert.NilError(t, cmd.Process.Kill())
	waitExit(t, cmd)
	poll.WaitOn(t, func(poll.LogT) poll.Result {
		if p := processesUsing(tmp); len(p) > 0 {
			return poll.Continue("still running: %v", p)
		}
		return poll.Success()
	}, poll.WithTimeout(10*time.Second))
	t.Setenv("TMPDIR", tmp)
	lab, err := harness.New(harness.Options{})
	assert.NilError(t, err)
	lab.Close()
	assert.DeepEqual(t, leftovers(tmp), []string(nil))
}

// TestInterruptedTestBinaryLeavesNothing runs a scenario in a child test
// binary and interrupts it mid-boot, as Ctrl-C on "go test" does.
func TestInterruptedTestBinaryLeavesNothing(t *testing.T) {
	guestTest(t)
	tmp := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run", "^TestHelperBootForever$", "-test.v")
	cmd.Env = append(cmd.Env, "NBH_HELPER_BOOT=1")
	startUntilQEMU(t, cmd, tmp)
	assert.NilError(t, cmd.Process.Signal(syscall.SIGINT))
	waitExit(t, cmd)
	assert.DeepEqual(t, processesUsing(tmp), []string(nil))
	assert.DeepEqual(t, leftovers(tmp), []string(nil))
	// nbhtest closed the lab, then let the signal take its default course:
	// the binary died of SIGINT, as it would have without nbh.
	ws := cmd.ProcessState.Sys().(syscall.WaitStatus)
	assert.Assert(t, ws.Signaled() && ws.Signal() == syscall.SIGINT, "child ended with %v", cmd.ProcessState)
}

// TestHelperBootForever is the child of TestInterruptedTestBinaryLeavesNothing.
func TestHelperBootForever(t *testing.T) {
	if os.Getenv("NBH_HELPER_BOOT") == "" {
		t.Skip("helper for TestInterruptedTestBinaryLeavesNothing")
	}
	lab := nbhtest.NewLab(t)
	// A shell as init waits on the console for ever: the guest never ends
	// by itself.
	g, err := lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: qemu.Direct, Append: "rdinit=/bin/sh",
		Expect: "never printed", Timeout: 10 * time.Minute})
	assert.NilError(t, err)
	os.Stderr.WriteString("helper: firmware started\n")
	v := g.Wait(context.Background())
	t.Errorf("the guest was to run until interrupted: %v", v.Err())
}
