package qemu

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"gotest.tools/v3/assert"
)

// The first lines of "info registers" as QEMU 7.2 prints them.
func TestProgramCounter(t *testing.T) {
	for _, c := range []struct{ regs, want string }{
		{"CPU#0\n PC=0000000047f0a1c0 X00=0000000000000000 X01=0000000000000000\nX02=0000000000000000", "0x47f0a1c0"},
		{"CPU#0\nEAX=00000000 EBX=00000000 ECX=00000000 EDX=00060fb1\nESI=00000000 EDI=00000000 EBP=00000000 ESP=00000000\nEIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0\n", "0xfff0"},
		{"CPU#0\nRAX=0000000000000000 RBX=0000000000000000\nRIP=ffffffff81e4a2b1 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n", "0xffffffff81e4a2b1"},
		{"CPU#0\n V      =   0\n pc       0000000000001000\n mhartid  0000000000000000\n mepc     0000000080200000\n", "0x1000"},
		{"CPU#0\n PC=0000000000000000 X00=0000000000000000", "0x0"},
		{"", ""},
		{"no registers here", ""},
	} {
		assert.Equal(t, programCounter(c.regs), c.want, "%q", c.regs)
	}
	assert.Assert(t, halted("EIP=0000fff2 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1"))
	assert.Assert(t, !halted("EIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0"))
}

// Each kind of standing still reads as what it is.
func TestActivityString(t *testing.T) {
	for _, c := range []struct {
		a    Activity
		want []string
	}{
		{Activity{Window: time.Second, Blocked: 2 * time.Second}, []string{"did not answer within 2s", "main loop was blocked"}},
		{Activity{Window: time.Second, Monitor: "paused", Run: -1, Wait: -1}, []string{"was paused, not running"}},
		{Activity{Window: time.Second, Monitor: "running", Run: 0.01, Wait: 0, PC: [2]string{"0xfff2", "0xfff2"}, Halted: true},
			[]string{"idle", "ran 1% of 1s", "pc 0xfff2 at both ends", "halted"}},
		{Activity{Window: time.Second, Monitor: "running", Run: 0.98, Wait: 0.01, PC: [2]string{"0x4000", "0x4010"}},
			[]string{"busy", "ran 98% of 1s", "waited 1% for a host CPU", "pc 0x4000, then 0x4010"}},
		{Activity{Window: time.Second, Monitor: "running", Run: 0.1, Wait: 0.85}, []string{"starved by the host", "waited 85%"}},
		// Barely ran but wanted to: not idle.
		{Activity{Window: time.Second, Monitor: "running", Run: 0.04, Wait: 0.45}, []string{"starved by the host"}},
		{Activity{Window: time.Second, Monitor: "running", Run: 0.04, Wait: 0.1}, []string{"busy"}},
		{Activity{Window: time.Second, Monitor: "exited"}, []string{"QEMU exited"}},
		{Activity{Window: time.Second, Monitor: "error: qmp: not connected"}, []string{"could not be asked", "not connected"}},
		{Activity{Window: time.Second, Monitor: "running", Run: -1, Wait: -1}, []string{"CPU time unknown"}},
	} {
		s := c.a.String()
		for _, w := range c.want {
			assert.Assert(t, strings.Contains(s, w), "%+v: %q lacks %q", c.a, s, w)
		}
	}
}

// TestSampleTellsSpinFromHaltFromStopped boots a real QEMU with a
// firmware of two instructions: one that spins at the reset vector, one
// that halts with interrupts off; and a QEMU that is SIGSTOPped. What the
// sample says comes from what the guest's code does, not from the sampler.
func TestSampleTellsSpinFromHaltFromStopped(t *testing.T) {
	if testing.Short() {
		t.Skip("boots QEMU")
	}
	if _, err := exec.LookPath(Binary("amd64")); err != nil {
		t.Skipf("no %s", Binary("amd64"))
	}
	// x86 starts at f000:fff0, the BIOS image's last 16 bytes.
	spin := []byte{0xeb, 0xfe}             // jmp $
	halt := []byte{0xfa, 0xf4, 0xeb, 0xfd} // cli; hlt; jmp back to hlt
	start := func(code []byte) *Process {
		dir := t.TempDir()
		bios := make([]byte, 64<<10)
		copy(bios[len(bios)-16:], code)
		assert.NilError(t, os.WriteFile(filepath.Join(dir, "bios.bin"), bios, 0o644))
		qmp := filepath.Join(dir, "qmp.sock")
		p := &Process{exited: make(chan struct{}), resets: make(chan time.Time, 8)}
		p.cmd = exec.Command(Binary("amd64"), "-nodefaults", "-no-user-config", "-display", "none", "-M", "pc",
			"-accel", "tcg", "-m", "16", "-bios", filepath.Join(dir, "bios.bin"), "-qmp", "unix:"+qmp+",server=on,wait=off")
		p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		assert.NilError(t, p.cmd.Start())
		go func() {
			p.exitErr = p.cmd.Wait()
			close(p.exited)
		}()
		t.Cleanup(p.Stop)
		assert.NilError(t, p.connectQMP(qmp))
		return p
	}

	ctx := context.Background()
	a := start(spin).Sample(ctx, time.Second)
	t.Logf("spin: %s", a)
	assert.Equal(t, a.Monitor, "running")
	// Ran, or wanted to and waited for a host CPU: a loaded host shares.
	assert.Assert(t, a.Run+a.Wait > 0.5, "%+v", a)
	assert.Equal(t, a.PC[1], "0xfff0", "%+v", a)
	assert.Assert(t, !a.Halted)

	a = start(halt).Sample(ctx, time.Second)
	t.Logf("halt: %s", a)
	assert.Equal(t, a.Monitor, "running")
	assert.Assert(t, a.Run >= 0 && a.Run < 0.05, "%+v", a)
	assert.Assert(t, a.Halted, "%+v", a)
	assert.Assert(t, strings.Contains(a.String(), "idle"), a.String())

	p := start(spin)
	assert.NilError(t, syscall.Kill(p.Pid(), syscall.SIGSTOP))
	began := time.Now()
	a = p.Sample(ctx, time.Second)
	took := time.Since(began)
	syscall.Kill(p.Pid(), syscall.SIGCONT)
	t.Logf("stopped: %s (%s)", a, took)
	assert.Equal(t, a.Monitor, "")
	assert.Assert(t, strings.Contains(a.String(), "did not answer"), a.String())
	// Its first question's grace, not the window and every question's.
	assert.Assert(t, took < 2*monitorGrace, "sampling a stuck QEMU took %s", took)

	// A QEMU that has exited is not a blocked one.
	p = start(spin)
	p.Kill()
	a = p.Sample(ctx, time.Second)
	t.Logf("exited: %s", a)
	assert.Equal(t, a.Monitor, "exited", "%+v", a)
	assert.Assert(t, strings.Contains(a.String(), "exited"), a.String())

	// The caller's end ends the sample.
	p = start(spin)
	cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	began = time.Now()
	p.Sample(cctx, 10*time.Second)
	assert.Assert(t, time.Since(began) < 5*time.Second, "a sample outlived its context by %s", time.Since(began))
}
