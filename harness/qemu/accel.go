package qemu

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
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
// host's own architecture; every other guest runs under TCG.
func Probe(arch string) Accel {
	if hostArch() != arch {
		return Accel{"tcg", "guest architecture differs from the host's"}
	}
	probeOnce.Do(func() { probed = probeKVM(arch) })
	return probed
}

// Choose is the acceleration for a guest of arch: the probe's ("" want),
// or the one asked for (kvm or tcg: the user knows better, or wants TCG's
// timing on a KVM host).
func Choose(arch, want string) (Accel, error) {
	switch want {
	case "":
		return Probe(arch), nil
	case "tcg", "kvm":
		return Accel{want, "asked for " + want}, nil
	}
	return Accel{}, fmt.Errorf("acceleration %q: want kvm, tcg or nothing (probe)", want)
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
	ran, why := probeGuest(arch, Accel{Name: "kvm"}, 3*time.Second)
	if ran {
		return Accel{"kvm", "probe: a guest ran under KVM (-accel kvm -cpu host)"}
	}
	return Accel{"tcg", "probe: QEMU with KVM ran no guest: " + why}
}

// probeArm64 is a guest of four instructions for the arm64 virt machine: it
// writes "K" to the PL011 UART at 0x09000000 and spins.
var probeArm64 = []uint32{
	0xD2A12000, // movz x0, #0x0900, lsl #16
	0x52800961, // movz w1, #'K'
	0x39000001, // strb w1, [x0]
	0x14000000, // b .
}

// probeGuest runs guest code under KVM on the machine nbh boots for arch
// (pc for amd64, virt for arm64), and says KVM works only when that code
// printed on the serial port: a /dev/kvm that opens, or a QEMU that starts
// paused, proves nothing (kvm_pvm runs QEMU but not a stock guest). On
// amd64 the code is SeaBIOS, which prints its banner; on arm64, probeArm64.
func probeGuest(arch string, accel Accel, limit time.Duration) (ran bool, why string) {
	args := append(accel.Args(arch), "-nodefaults", "-no-user-config", "-nographic",
		"-monitor", "none", "-serial", "stdio")
	want := "SeaBIOS"
	switch arch {
	case "amd64":
		args = append(args, "-machine", "pc")
	case "arm64":
		f, err := os.CreateTemp("", "nbh-kvm-probe-*.bin")
		if err != nil {
			return false, err.Error()
		}
		defer os.Remove(f.Name())
		for _, w := range probeArm64 {
			f.Write([]byte{byte(w), byte(w >> 8), byte(w >> 16), byte(w >> 24)})
		}
		f.Close()
		args = append(args, "-machine", "virt", "-kernel", f.Name())
		want = "K"
	default:
		return false, "no probe for " + arch
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, Binary(arch), args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return false, err.Error()
	}
	if err := cmd.Start(); err != nil {
		return false, err.Error()
	}
	seen := make(chan bool, 1)
	go func() {
		var got []byte
		buf := make([]byte, 512)
		for {
			n, err := out.Read(buf)
			got = append(got, buf[:n]...)
			if strings.Contains(string(got), want) {
				seen <- true
				return
			}
			if err != nil {
				seen <- false
				return
			}
		}
	}()
	select {
	case ran = <-seen:
	case <-ctx.Done():
	}
	cmd.Process.Kill()
	cmd.Wait()
	if ran {
		return true, ""
	}
	msg := strings.TrimSpace(stderr.String())
	if len(msg) > 200 {
		msg = msg[:200]
	}
	if msg == "" {
		msg = fmt.Sprintf("no guest output within %s", limit)
	}
	return false, msg
}
