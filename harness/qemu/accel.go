package qemu

import (
	"context"
	"os"
	"os/exec"
	"runtime"
	"sync"
	"time"
)

// Accel is how QEMU runs guest code.
type Accel struct {
	Name string // "kvm" or "tcg"
	Why  string // how it was decided, for the log
}

// Args returns the acceleration and CPU flags for a guest of arch.
func (a Accel) Args(arch string) []string {
	if a.Name == "kvm" {
		return []string{"-accel", "kvm", "-cpu", "host"}
	}
	args := []string{"-accel", "tcg"}
	if arch == "arm64" {
		// -cpu max is ~5x slower under TCG (software pointer authentication).
		args = append(args, "-cpu", "cortex-a72")
	}
	return args
}

var (
	probeOnce sync.Once
	probed    Accel
)

// Probe decides, once per process, whether KVM really works for guests of the
// host's own architecture; every other guest runs under TCG. $NBH_ACCEL
// (kvm or tcg) overrides the probe.
func Probe(arch string) Accel {
	if hostArch() != arch {
		return Accel{"tcg", "guest architecture differs from the host's"}
	}
	switch os.Getenv("NBH_ACCEL") {
	case "tcg":
		return Accel{"tcg", "NBH_ACCEL=tcg"}
	case "kvm":
		return Accel{"kvm", "NBH_ACCEL=kvm"}
	}
	probeOnce.Do(func() { probed = probeKVM(arch) })
	return probed
}

func hostArch() string { return runtime.GOARCH }

func probeKVM(arch string) Accel {
	// kvm_pvm is a software hypervisor that runs only PVM-enabled guests: a
	// stock kernel hangs under it, although /dev/kvm opens fine.
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		return Accel{"tcg", "/dev/kvm is kvm_pvm, which cannot run stock kernels"}
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return Accel{"tcg", "no usable /dev/kvm (" + err.Error() + ")"}
	}
	f.Close()
	// A QEMU that cannot use KVM exits at once; one that can stays up,
	// paused, until the probe ends it.
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	cmd := exec.CommandContext(ctx, Binary(arch), "-accel", "kvm", "-cpu", "host", "-machine", "q35",
		"-nodefaults", "-no-user-config", "-display", "none", "-S")
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return Accel{"kvm", "probe: QEMU started with -accel kvm -cpu host"}
	}
	msg := string(out)
	if err != nil && msg == "" {
		msg = err.Error()
	}
	if len(msg) > 200 {
		msg = msg[:200]
	}
	return Accel{"tcg", "probe: QEMU with KVM failed: " + msg}
}
