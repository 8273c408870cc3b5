package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Activity is what a running QEMU was doing over a short window, sampled
// when a boot stood still past its deadline. It tells a guest that hung
// (its vCPU spinning, or idle waiting for an event that never came) from
// an emulator that was not running it (a monitor that does not answer: the
// main loop blocked; a vCPU thread that waited for a host CPU: an
// overloaded host) — which "deadline exceeded" alone cannot.
type Activity struct {
	Window time.Duration
	// Monitor is QMP's run state ("running", "paused", ...); "" when the
	// monitor did not answer (Blocked says how long it was given).
	Monitor string
	Blocked time.Duration
	// Run and Wait are the shares of the window the vCPU thread ran on a
	// host CPU and waited in a host run queue for one; -1 unknown.
	Run, Wait float64
	// PC is the vCPU's program counter at the window's start and end, as
	// QEMU prints it ("" unknown); Halted: x86's HLT flag at the end.
	PC     [2]string
	Halted bool
}

// monitorGrace is how long the monitor gets to answer the questions before
// the window, together (and the one after it): a QEMU whose main loop runs
// answers in milliseconds.
const monitorGrace = 2 * time.Second

// Sample watches p for window and says what it was doing. It returns
// within window plus monitorGrace, sooner when ctx ends (with what it
// has) or QEMU exits.
func (p *Process) Sample(ctx context.Context, window time.Duration) Activity {
	a := Activity{Window: window, Run: -1, Wait: -1}
	grace := time.Now().Add(monitorGrace)
	ask := func(f func(context.Context) (string, error)) (string, bool) {
		qctx, cancel := context.WithDeadline(ctx, grace)
		defer cancel()
		s, err := f(qctx)
		switch {
		case err == nil:
			return s, true
		case p.hasExited():
			a.Monitor = "exited"
		case ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded):
			a.Monitor, a.Blocked = "", monitorGrace
		case ctx.Err() == nil && a.Monitor == "":
			a.Monitor = "error: " + err.Error()
		}
		return "", false
	}
	st, ok := ask(p.status)
	if !ok {
		return a
	}
	a.Monitor = st
	tid, _ := ask(p.vcpuThread)
	a.PC[0], _ = ask(p.pc)
	if a.Monitor != st {
		return a
	}
	t0 := time.Now()
	before, okBefore := threadTimes(p.Pid(), tid)
	select {
	case <-time.After(window):
	case <-ctx.Done():
		return a
	case <-p.exited:
		a.Monitor = "exited"
		return a
	}
	after, okAfter := threadTimes(p.Pid(), tid)
	took := time.Since(t0)
	if p.hasExited() {
		// The pid may be another process's by now.
		a.Monitor = "exited"
		return a
	}
	if okBefore && okAfter {
		a.Window = took
		a.Run = (after.run - before.run).Seconds() / took.Seconds()
		if after.wait >= 0 && before.wait >= 0 {
			a.Wait = (after.wait - before.wait).Seconds() / took.Seconds()
		}
	}
	// A fresh grace for the last question: the window was not the
	// monitor's time.
	grace = time.Now().Add(monitorGrace)
	if regs, ok := ask(p.registers); ok {
		a.PC[1] = programCounter(regs)
		a.Halted = halted(regs)
	}
	return a
}

func (p *Process) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// vcpuThread is the host thread that runs the first vCPU.
func (p *Process) vcpuThread(ctx context.Context) (string, error) {
	out, err := p.RunContext(ctx, "query-cpus-fast", nil)
	if err != nil {
		return "", err
	}
	var cpus []struct {
		Thread int `json:"thread-id"`
	}
	if err := json.Unmarshal(out, &cpus); err != nil || len(cpus) == 0 {
		return "", fmt.Errorf("query-cpus-fast: no vCPU in %s", out)
	}
	return strconv.Itoa(cpus[0].Thread), nil
}

// registers is the first vCPU's registers as the human monitor prints them.
func (p *Process) registers(ctx context.Context) (string, error) {
	out, err := p.RunContext(ctx, "human-monitor-command", map[string]any{"command-line": "info registers"})
	if err != nil {
		return "", err
	}
	var s string
	err = json.Unmarshal(out, &s)
	return s, err
}

func (p *Process) pc(ctx context.Context) (string, error) {
	regs, err := p.registers(ctx)
	return programCounter(regs), err
}

// The program counter in "info registers": arm64 " PC=...", x86 "RIP=..."
// or "EIP=...", riscv " pc       ...".
var pcRE = regexp.MustCompile(`(?m)(?:\bPC=|\bRIP=|\bEIP=|^\s*pc\s+)([0-9a-fA-F]+)\b`)

func programCounter(regs string) string {
	if m := pcRE.FindStringSubmatch(regs); m != nil {
		if v := strings.TrimLeft(strings.ToLower(m[1]), "0"); v != "" {
			return "0x" + v
		}
		return "0x0"
	}
	return ""
}

func halted(regs string) bool { return strings.Contains(regs, " HLT=1") }

type cpuTimes struct{ run, wait time.Duration }

// threadTimes is how long thread tid of pid ran and waited to run: the
// scheduler's own account (schedstat), else the CPU ticks in stat with the
// wait unknown. Without the vCPU's thread there is nothing to measure (the
// process's own files are its main thread's, not the guest's).
func threadTimes(pid int, tid string) (cpuTimes, bool) {
	if tid == "" {
		return cpuTimes{}, false
	}
	dir := fmt.Sprintf("/proc/%d/task/%s", pid, tid)
	if b, err := os.ReadFile(dir + "/schedstat"); err == nil {
		f := strings.Fields(string(b))
		if len(f) >= 2 {
			run, err1 := strconv.ParseInt(f[0], 10, 64)
			wait, err2 := strconv.ParseInt(f[1], 10, 64)
			// All zeros: a kernel without sched_info accounting,
			// which still prints the file.
			if err1 == nil && err2 == nil && run+wait > 0 {
				return cpuTimes{time.Duration(run), time.Duration(wait)}, true
			}
		}
	}
	b, err := os.ReadFile(dir + "/stat")
	if err != nil {
		return cpuTimes{}, false
	}
	// The command's name is in parentheses and may hold spaces: the
	// fields are counted from after its last ")".
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return cpuTimes{}, false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return cpuTimes{}, false
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return cpuTimes{}, false
	}
	// Linux reports these in USER_HZ, 100 on every architecture it has.
	return cpuTimes{run: time.Duration(utime+stime) * 10 * time.Millisecond, wait: -1}, true
}

// String says what the machine was doing, for a verdict's detail.
func (a Activity) String() string {
	switch {
	case a.Monitor == "" && a.Blocked > 0:
		return fmt.Sprintf("QEMU's monitor did not answer within %s: the emulator's main loop was blocked, not running the guest", a.Blocked)
	case a.Monitor == "exited":
		return "QEMU exited while it was sampled"
	case strings.HasPrefix(a.Monitor, "error: "):
		return "QEMU's monitor could not be asked what the machine was doing (" + strings.TrimPrefix(a.Monitor, "error: ") + ")"
	case a.Monitor == "":
		return ""
	case a.Monitor != "running":
		return fmt.Sprintf("the machine was %s, not running", a.Monitor)
	}
	var b strings.Builder
	window := a.Window.Round(100 * time.Millisecond)
	switch {
	case a.Run < 0:
		b.WriteString("the machine was running (its vCPU's CPU time unknown)")
	case a.Run+a.Wait < 0.05:
		fmt.Fprintf(&b, "the machine was idle: its vCPU ran %s of %s (the guest waited for something that did not come)", pct(a.Run), window)
	case a.Wait > a.Run && a.Wait >= 0.25:
		fmt.Fprintf(&b, "the machine was starved by the host: its vCPU waited %s of %s for a host CPU and ran %s", pct(a.Wait), window, pct(a.Run))
	default:
		fmt.Fprintf(&b, "the machine was busy: its vCPU ran %s of %s", pct(a.Run), window)
		if a.Wait >= 0 {
			fmt.Fprintf(&b, " (and waited %s for a host CPU)", pct(a.Wait))
		}
	}
	switch {
	case a.PC[0] != "" && a.PC[0] == a.PC[1]:
		fmt.Fprintf(&b, "; pc %s at both ends", a.PC[0])
	case a.PC[0] != "" && a.PC[1] != "":
		fmt.Fprintf(&b, "; pc %s, then %s", a.PC[0], a.PC[1])
	case a.PC[1] != "":
		fmt.Fprintf(&b, "; pc %s", a.PC[1])
	}
	if a.Halted {
		b.WriteString(", halted (HLT)")
	}
	return b.String()
}

func pct(f float64) string { return fmt.Sprintf("%.0f%%", 100*min(max(f, 0), 1)) }
