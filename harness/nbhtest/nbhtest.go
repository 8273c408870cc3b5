// Package nbhtest runs the lab inside go test: a lab whose guests and
// services end with the test, artifacts where go test -artifacts (or
// $NBH_ARTIFACTS) keeps them, a repro bundle of every guest of a failed
// test, and each guest's stage durations as test attributes (gotestsum puts
// them into JUnit as properties).
//
//	func TestMyBoot(t *testing.T) {
//		lab := nbhtest.NewLab(t)
//		g, err := lab.Boot(t.Context(), harness.Spec{Arch: "amd64", Firmware: "seabios-ipxe",
//			Artifacts: nbhtest.Artifacts(t, "g1")})
//		if err != nil {
//			t.Fatal(err)
//		}
//		if v := g.Wait(t.Context()); !v.OK {
//			t.Fatal(v.Err())
//		}
//	}
package nbhtest

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/images"
)

// NewLab starts a lab whose guests and services end with the test. When
// the test fails, every guest it booted leaves a repro bundle (logged as
// "reproduce: nbh repro PATH"). While a lab is open, SIGINT and SIGTERM
// close every open lab, then the test binary dies of that signal.
func NewLab(t testing.TB) *harness.Lab {
	t.Helper()
	return NewLabWith(t, harness.Options{})
}

// Cache is the image cache the scenarios use: $NBH_CACHE, else the
// default (.cache of the nbh checkout).
func Cache() *images.Cache { return images.Open(os.Getenv("NBH_CACHE")) }

// Chains lists the boot chains the scenarios boot: all of them, narrowed by
// $NBH_ARCH and $NBH_FIRMWARE (comma-separated lists), so CI can shard.
func Chains() []harness.Chain {
	return harness.SelectChains(os.Getenv("NBH_ARCH"), os.Getenv("NBH_FIRMWARE"))
}

// NewLabWith is NewLab with options (an IPsec-required network, a smaller
// MTU); the log always goes to the test's. The image cache is $NBH_CACHE's
// unless opts names one, and $NBH_ACCEL (kvm or tcg) overrides the
// acceleration probe unless opts sets it.
func NewLabWith(t testing.TB, opts harness.Options) *harness.Lab {
	t.Helper()
	opts.Log = testLog{t}
	if opts.Cache == nil {
		opts.Cache = Cache()
	}
	if opts.Accel == "" {
		opts.Accel = os.Getenv("NBH_ACCEL")
	}
	l, err := harness.New(opts)
	if err != nil {
		t.Fatalf("lab: %v", err)
	}
	track(l, true)
	labsMu.Lock()
	labsOf[t] = append(labsOf[t], l)
	labsMu.Unlock()
	t.Cleanup(func() {
		if interrupted.Load() {
			// The signal handler is closing the labs and will end the
			// binary with the signal; finishing the test here would end
			// it first, with a test failure's status instead.
			l.Close()
			time.Sleep(time.Minute)
		}
		track(l, false)
		for _, g := range l.Guests() {
			g.Close() // artifacts complete; the lab's folder still there
			record(t, g)
		}
		l.Close()
		labsMu.Lock()
		rest := labsOf[t][:0]
		for _, o := range labsOf[t] {
			if o != l {
				rest = append(rest, o)
			}
		}
		labsOf[t] = rest
		last := len(rest) == 0
		labsMu.Unlock()
		if last {
			dropTempArtifacts(t)
		}
	})
	return l
}

// record puts a guest's stage durations on the test as attributes and, if
// the test failed, leaves a repro bundle of its boot.
func record(t testing.TB, g *harness.Guest) {
	v, decided := g.Verdict()
	if !decided {
		return
	}
	for _, s := range g.Spans() {
		t.Attr(fmt.Sprintf("nbh.%s.%s", g.Name, s.Stage), fmt.Sprintf("%.3fs", s.Duration.Seconds()))
	}
	t.Attr("nbh."+g.Name+".outcome", outcome(v))
	if !t.Failed() || interrupted.Load() {
		return // interrupted: the user stopped the run, nothing to reproduce
	}
	dir := g.Dir
	temp := tempArtifacts(t)
	if g.Spec().Artifacts == "" || temp != "" && strings.HasPrefix(dir, temp+string(filepath.Separator)) {
		// Artifacts nobody asked to keep (in the lab's own folder, or
		// in the test's temporary one): the bundle goes where it stays.
		kept, err := os.MkdirTemp(bundleRoot(), safeName(t.Name())+"-"+g.Name+"-")
		if err != nil {
			t.Logf("no repro bundle for %s: %v", g.Name, err)
			return
		}
		dir = kept
	}
	if err := g.WriteBundle(dir, v); err != nil {
		t.Logf("no repro bundle for %s: %v", g.Name, err)
		return
	}
	t.Logf("%s: %s; reproduce: nbh repro %s", g.Name, outcome(v), dir)
}

func outcome(v harness.Verdict) string {
	if v.OK {
		return "marker"
	}
	return fmt.Sprintf("%s at %s", v.Reason, v.Stage)
}

// bundleRoot is where bundles of failed tests go when the test keeps no
// artifacts: $NBH_BUNDLES, else nbh-bundles in the temporary folder.
func bundleRoot() string {
	root := os.Getenv("NBH_BUNDLES")
	if root == "" {
		root = filepath.Join(os.TempDir(), "nbh-bundles")
	}
	os.MkdirAll(root, 0o755)
	return root
}

// Artifacts is the artifacts folder for a guest of the current test:
// $NBH_ARTIFACTS/<test>/<guest> when that is set, else under t.ArtifactDir()
// when go test runs with -artifacts, else a temporary folder that goes with
// the test's last lab (after its guests have written into it).
func Artifacts(t testing.TB, guest string) string {
	t.Helper()
	if d := os.Getenv("NBH_ARTIFACTS"); d != "" {
		return filepath.Join(d, safeName(t.Name()), guest)
	}
	if f := flag.Lookup("test.artifacts"); f != nil && f.Value.String() == "true" {
		return filepath.Join(t.ArtifactDir(), guest)
	}
	return filepath.Join(tempArtifactsMake(t), guest)
}

func safeName(name string) string { return strings.ReplaceAll(name, "/", "_") }

// The temporary artifacts folders, per test. t.TempDir would be removed
// before the lab's cleanup (cleanups run last-in first-out) while QEMU still
// writes into it; these go after the lab is closed.
var (
	tempMu sync.Mutex
	temps  = map[testing.TB]string{}
)

func tempArtifacts(t testing.TB) string {
	tempMu.Lock()
	defer tempMu.Unlock()
	return temps[t]
}

func tempArtifactsMake(t testing.TB) string {
	tempMu.Lock()
	defer tempMu.Unlock()
	if d, ok := temps[t]; ok {
		return d
	}
	d, err := os.MkdirTemp("", "nbh-test-artifacts-")
	if err != nil {
		t.Fatalf("artifacts: %v", err)
	}
	temps[t] = d
	t.Cleanup(func() {
		// With a lab in the test, its cleanup (which runs after this one)
		// removes the folder once the guests are closed.
		labsMu.Lock()
		owned := len(labsOf[t]) > 0
		labsMu.Unlock()
		if !owned {
			dropTempArtifacts(t)
		}
	})
	return d
}

func dropTempArtifacts(t testing.TB) {
	tempMu.Lock()
	d, ok := temps[t]
	delete(temps, t)
	tempMu.Unlock()
	if ok {
		os.RemoveAll(d)
	}
}

type testLog struct{ t testing.TB }

func (w testLog) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

var (
	labsMu sync.Mutex
	labsOf = map[testing.TB][]*harness.Lab{}

	openMu   sync.Mutex
	openLabs = map[*harness.Lab]bool{}
	signals  = make(chan os.Signal, 1)
	sigOnce  sync.Once
	// interrupted is set once a signal arrived: the cleanups still
	// running write no bundles.
	interrupted atomic.Bool
)

// track records a lab opening or closing. While at least one lab is open,
// SIGINT and SIGTERM are caught (see onSignal); with none open the test
// binary's own handling is back, so a test that uses no lab, or runs after
// the last one closed, sees no difference.
func track(l *harness.Lab, open bool) {
	openMu.Lock()
	defer openMu.Unlock()
	sigOnce.Do(func() { go onSignal() })
	if open {
		if len(openLabs) == 0 {
			signal.Notify(signals, os.Interrupt, syscall.SIGTERM)
		}
		openLabs[l] = true
		return
	}
	delete(openLabs, l)
	if len(openLabs) == 0 {
		signal.Stop(signals)
	}
}

// onSignal closes the open labs (QEMU stopped, temp folders and sockets
// removed) and then dies of the same signal, with its default action, so
// go test and the shell see the status they would have seen without nbh.
// Why a test helper catches signals at all: go test's own handling kills
// the binary at once, skipping every t.Cleanup, and leaves the lab's
// folders behind. The harness package itself installs no handler.
func onSignal() {
	for s := range signals {
		interrupted.Store(true)
		openMu.Lock()
		labs := make([]*harness.Lab, 0, len(openLabs))
		for l := range openLabs {
			labs = append(labs, l)
		}
		openMu.Unlock()
		for _, l := range labs {
			l.Close()
		}
		signal.Reset(s)
		_ = syscall.Kill(os.Getpid(), s.(syscall.Signal))
	}
}
