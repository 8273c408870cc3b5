package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Process is a running QEMU.
type Process struct {
	Args []string
	cmd  *exec.Cmd

	stderr  bytes.Buffer
	exited  chan struct{}
	exitErr error

	mu  sync.Mutex
	mon *monitor

	resets chan time.Time // the machine's resets (QMP RESET events)
}

// Start runs QEMU for c with tty as its stdio (the serial console) and net as
// the stream netdev's descriptor (nil with c.UserNet). QEMU is in its own process group and gets
// SIGKILL if this process dies first, so it cannot outlive its run even when
// the test binary is killed.
func Start(c Config, tty *os.File, net *os.File) (*Process, error) {
	bin, err := exec.LookPath(Binary(c.Arch))
	if err != nil {
		return nil, fmt.Errorf("qemu: %s is not installed: %w", Binary(c.Arch), err)
	}
	c.NetFD = 3 // first of ExtraFiles
	args, err := Args(c)
	if err != nil {
		return nil, err
	}
	argv := append([]string{bin}, args...)
	if t := c.TapNet; t != nil && t.Netns != "" {
		// QEMU opens the tap device in the namespace that has it.
		ip, err := exec.LookPath("ip")
		if err != nil {
			return nil, fmt.Errorf("qemu: a tap network in namespace %s needs ip (iproute2): %w", t.Netns, err)
		}
		argv = append([]string{ip, "netns", "exec", t.Netns}, argv...)
	}
	p := &Process{Args: argv, exited: make(chan struct{}), resets: make(chan time.Time, 8)}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin, cmd.Stdout = tty, tty
	cmd.Stderr = &lockedWriter{w: &p.stderr, mu: &p.mu}
	if net != nil {
		cmd.ExtraFiles = []*os.File{net}
	}
	cmd.Dir = c.Dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("qemu: start: %w", err)
	}
	p.cmd = cmd
	go func() {
		p.exitErr = cmd.Wait()
		close(p.exited)
	}()
	if err := p.connectQMP(c.QMP); err != nil {
		p.Kill()
		return nil, err
	}
	return p, nil
}

type lockedWriter struct {
	w  *bytes.Buffer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// connectQMP waits for QEMU's QMP socket, connects, and removes the socket's
// path (the connection lives on; nothing is left on disk).
func (p *Process) connectQMP(path string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-p.exited:
			return fmt.Errorf("qemu exited at start: %s", p.Stderr())
		default:
		}
		if _, err := os.Stat(path); err == nil {
			mon, err := dialMonitor(path, 2*time.Second, p.event)
			if err == nil {
				os.Remove(path)
				p.mu.Lock()
				p.mon = mon
				p.mu.Unlock()
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("qemu: no QMP socket after 10s: %s", p.Stderr())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// event is QMP's event e (from the monitor's reader: it must not block).
func (p *Process) event(e qmpEvent) {
	if e.Event != "RESET" {
		return
	}
	// QEMU's own time of the reset, not when it was read: the console's
	// lines are judged by boot against it.
	at := e.Time()
	if e.Timestamp.Seconds == 0 {
		at = time.Now()
	}
	select {
	case p.resets <- at:
	default: // nobody is waiting for this many
	}
}

// Resets delivers the time of each machine reset (a guest's reboot, or
// SystemReset) while the reboot action is reset (SetRebootAction).
func (p *Process) Resets() <-chan time.Time { return p.resets }

// SetRebootAction says what a reset does: restart the machine (reset
// true) or end QEMU (false, -no-reboot's default: a guest that reboots on
// a panic must not boot again unobserved).
func (p *Process) SetRebootAction(reset bool) error {
	action := "shutdown"
	if reset {
		action = "reset"
	}
	_, err := p.Run("set-action", map[string]any{"reboot": action})
	return err
}

// SystemReset presses the machine's reset button.
func (p *Process) SystemReset() error {
	_, err := p.Run("system_reset", nil)
	return err
}

// Exited is closed when QEMU has exited.
func (p *Process) Exited() <-chan struct{} { return p.exited }

// ExitError is QEMU's exit status once Exited is closed.
func (p *Process) ExitError() error {
	<-p.exited
	return p.exitErr
}

// Stderr is what QEMU printed on standard error.
func (p *Process) Stderr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.TrimSpace(p.stderr.String())
}

// Run sends one QMP command and returns its "return" value, waiting for
// it as long as QEMU's monitor is connected.
func (p *Process) Run(command string, args map[string]any) (json.RawMessage, error) {
	return p.RunContext(context.Background(), command, args)
}

// RunContext is Run, giving up when ctx ends.
func (p *Process) RunContext(ctx context.Context, command string, args map[string]any) (json.RawMessage, error) {
	p.mu.Lock()
	mon := p.mon
	p.mu.Unlock()
	if mon == nil {
		return nil, fmt.Errorf("qmp: not connected")
	}
	out, err := mon.run(ctx, command, args)
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", command, err)
	}
	return out, nil
}

// Status is QEMU's run state ("running", "shutdown", ...).
func (p *Process) Status() (string, error) { return p.status(context.Background()) }

func (p *Process) status(ctx context.Context) (string, error) {
	out, err := p.RunContext(ctx, "query-status", nil)
	if err != nil {
		return "", err
	}
	var st struct {
		Status string `json:"status"`
	}
	err = json.Unmarshal(out, &st)
	return st.Status, err
}

// SetLink sets the NIC's link up or down.
func (p *Process) SetLink(up bool) error {
	_, err := p.Run("set_link", map[string]any{"name": "n0", "up": up})
	return err
}

// Stop ends QEMU: politely by QMP "quit", then by SIGKILL to its process
// group. It returns once QEMU has exited.
func (p *Process) Stop() {
	select {
	case <-p.exited:
	default:
		p.mu.Lock()
		mon := p.mon
		p.mu.Unlock()
		if mon != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			go mon.run(ctx, "quit", nil)
			select {
			case <-p.exited:
			case <-ctx.Done():
			}
			cancel()
		}
		p.Kill()
	}
	p.mu.Lock()
	mon := p.mon
	p.mon = nil
	p.mu.Unlock()
	if mon != nil {
		// Outside the lock: the reader may still be delivering.
		mon.close()
	}
}

// Kill ends QEMU at once and waits for it.
func (p *Process) Kill() {
	if p.cmd != nil && p.cmd.Process != nil {
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	}
	<-p.exited
}

// Pid is QEMU's process ID.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Version is the first line of `qemu-system-X --version` for guests of
// arch, for reports and bundles; asked once per process (every failed
// matrix row writes a bundle).
func Version(arch string) string {
	versionMu.Lock()
	defer versionMu.Unlock()
	if v, ok := versions[arch]; ok {
		return v
	}
	v := "unknown"
	if out, err := exec.Command(Binary(arch), "--version").Output(); err != nil {
		v = "unknown (" + err.Error() + ")"
	} else {
		line, _, _ := strings.Cut(string(out), "\n")
		v = strings.TrimSpace(line)
	}
	versions[arch] = v
	return v
}

var (
	versionMu sync.Mutex
	versions  = map[string]string{}
)
