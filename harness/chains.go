package harness

import (
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"nbh.dev/nbh/harness/qemu"
)

// Chains lists the boot chains to run, narrowed by $NBH_ARCH and
// $NBH_FIRMWARE (comma-separated lists), so CI can shard the matrix.
func Chains() []qemu.Profile {
	return SelectChains(os.Getenv("NBH_ARCH"), os.Getenv("NBH_FIRMWARE"))
}

// SelectChains lists the chains whose architecture is in arches and whose
// firmware is in fws (comma-separated; empty or "all": any).
func SelectChains(arches, fws string) []qemu.Profile {
	archSet, fwSet := list(arches), list(fws)
	var out []qemu.Profile
	for _, p := range qemu.Profiles {
		if (archSet == nil || archSet[p.Arch]) && (fwSet == nil || fwSet[p.Firmware]) {
			out = append(out, p)
		}
	}
	return out
}

func list(v string) map[string]bool {
	v = strings.TrimSpace(v)
	if v == "" || v == "all" {
		return nil
	}
	m := map[string]bool{}
	for _, s := range strings.Split(v, ",") {
		m[strings.TrimSpace(s)] = true
	}
	return m
}

// NewTestLab starts a lab whose guests and services end with the test.
// Artifacts go to $NBH_ARTIFACTS/<test name>/<guest> when that is set, else
// into the test's temporary folder. SIGINT and SIGTERM stop every open lab
// before the test binary dies.
func NewTestLab(t testing.TB) *Lab {
	t.Helper()
	return NewTestLabWith(t, Options{})
}

// NewTestLabWith is NewTestLab with options (an IPsec-required network, a
// smaller MTU); the log always goes to the test's.
func NewTestLabWith(t testing.TB, opts Options) *Lab {
	t.Helper()
	cleanupOnSignal()
	opts.Log = testLog{t}
	l, err := New(opts)
	if err != nil {
		t.Fatalf("lab: %v", err)
	}
	track(l, true)
	t.Cleanup(func() {
		track(l, false)
		l.Close()
	})
	return l
}

// TestArtifacts is the artifacts folder for a guest of the current test.
func TestArtifacts(t testing.TB, guest string) string {
	if d := os.Getenv("NBH_ARTIFACTS"); d != "" {
		return filepath.Join(d, strings.ReplaceAll(t.Name(), "/", "_"), guest)
	}
	return filepath.Join(t.TempDir(), guest)
}

type testLog struct{ t testing.TB }

func (w testLog) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

var (
	openMu   sync.Mutex
	openLabs = map[*Lab]bool{}
	sigOnce  sync.Once
)

func track(l *Lab, open bool) {
	openMu.Lock()
	defer openMu.Unlock()
	if open {
		openLabs[l] = true
	} else {
		delete(openLabs, l)
	}
}

// cleanupOnSignal makes SIGINT/SIGTERM close open labs (QEMU stopped, temp
// folders removed) and then end the process with the signal's usual status.
func cleanupOnSignal() {
	sigOnce.Do(func() {
		c := make(chan os.Signal, 1)
		signal.Notify(c, os.Interrupt, syscall.SIGTERM)
		go func() {
			s := <-c
			openMu.Lock()
			labs := make([]*Lab, 0, len(openLabs))
			for l := range openLabs {
				labs = append(labs, l)
			}
			openMu.Unlock()
			for _, l := range labs {
				l.Close()
			}
			os.Exit(128 + int(s.(syscall.Signal)))
		}()
	})
}

// pidAlive reports whether a process exists.
func pidAlive(pid int) bool {
	return syscall.Kill(pid, 0) == nil || syscall.Kill(pid, 0) == syscall.EPERM
}

// sweepStale removes lab folders left by processes that died without
// cleaning up (a SIGKILL, a panic): their names carry the owner's PID.
func sweepStale() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "nbh-lab-*-*"))
	for _, d := range dirs {
		parts := strings.Split(filepath.Base(d), "-")
		if len(parts) < 4 {
			continue
		}
		pid, err := strconv.Atoi(parts[2])
		if err != nil || pid == os.Getpid() || pidAlive(pid) {
			continue
		}
		os.RemoveAll(d)
	}
}
