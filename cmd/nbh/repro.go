package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/term"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/bundle"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/images"
	"nbh.dev/nbh/matrix"
	"nbh.dev/nbh/report"
)

// isBundle reports whether dir holds a repro bundle.
func isBundle(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, bundle.SpecFile))
	return err == nil
}

func reproCmd(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("repro", flag.ContinueOnError)
	count := fs.Int("count", 1, "replay N times and report how often the recorded outcome came back (flake hunting)")
	latest := fs.Bool("latest", false, "boot the packages this nbh pins instead of the bundle's (when the archive no longer serves those)")
	artifacts := fs.String("artifacts", "", "keep each replay's artifacts (a bundle of the replay) in DIR/run-N (default: a temporary folder, kept only for a replay that came out differently)")
	cache := fs.String("cache", os.Getenv("NBH_CACHE"), "image cache folder (default: $NBH_CACHE, else .cache in the nbh source tree)")
	quiet := fs.Bool("quiet", false, "no live progress, only the comparison")
	hostPaths := fs.Bool("host-paths", false, "allow a bundle that serves paths of this machine (its root tree or image, its --serve tree, recorded by host path) to serve them to its guest; without it such a bundle is refused with the paths named")
	interactive := fs.Bool("interactive", false, "the terminal becomes the replayed guest's serial console, as with nbh boot --interactive (Ctrl-] q quits)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: nbh repro [flags] BUNDLE

Replays a repro bundle — the folder a failed nbh boot, matrix row or go test
scenario left (or that folder packed as .tar.zst) — with the same chain,
faults, network, MAC, address, seed and package pins, and prints the recorded
and the replayed verdict side by side. Exit status: 0 the recorded outcome
came back (with --count: at least once), 1 it did not, 2 bad usage or a bad
bundle, 3 the lab could not be set up (a pinned package the archive no longer
serves: see --latest).

Flags:
`)
		fs.PrintDefaults()
	}
	files, code, ok := parseWithFiles(fs, args)
	if !ok {
		return code
	}
	if len(files) != 1 {
		fmt.Fprintln(os.Stderr, "nbh repro: want one bundle (a folder or a .tar.zst)")
		return exitUsage
	}
	if *count < 1 {
		fmt.Fprintln(os.Stderr, "nbh repro: --count: want 1 or more")
		return exitUsage
	}
	if *interactive && !term.IsTerminal(int(os.Stdin.Fd())) {
		fmt.Fprintln(os.Stderr, "nbh repro: --interactive needs a terminal on standard input")
		return exitUsage
	}
	if *interactive && *count > 1 {
		fmt.Fprintln(os.Stderr, "nbh repro: --interactive replays once; drop --count")
		return exitUsage
	}
	b, recorded, done, err := bundle.Open(files[0])
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh repro: %v\n", err)
		return exitUsage
	}
	defer done()
	opts, spec, err := harness.FromBundle(b)
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh repro: %v\n", err)
		return exitUsage
	}
	if paths := harness.HostPaths(b); len(paths) > 0 && !*hostPaths {
		// A bundle from elsewhere must not choose what of this machine a
		// guest gets to read.
		fmt.Fprintf(os.Stderr, "nbh repro: the bundle serves these paths of this machine to its guest (a root tree or image, a served tree): %s\nrun it again with --host-paths if that is what you want (they are only read: a replay serves a copy of a root)\n", strings.Join(paths, ", "))
		return exitUsage
	}
	c := images.Open(*cache)
	if !*latest {
		pins, err := harness.BundlePins(b)
		if err != nil {
			fmt.Fprintf(os.Stderr, "nbh repro: %v\n", err)
			return exitUsage
		}
		if own, err := images.Pinned(spec.Arch); err == nil {
			if n := pinsDiffer(own, pins); n > 0 {
				fmt.Fprintf(os.Stderr, "nbh repro: the bundle pins %d package(s) at other versions than this nbh; booting the bundle's (--latest: this nbh's)\n", n)
			}
		}
		c.PinsOverride = map[string]images.PinSet{spec.Arch: pins}
	}
	opts.Cache = c
	if !*quiet {
		opts.Log = os.Stderr
	}
	r := b.Recorded
	fmt.Printf("bundle: %s\n  %s\n  recorded by nbh %s on %s, %s, %s\n  recorded outcome: %s\n",
		files[0], describe(b.Spec), r.NBH, r.Host, r.QEMU, r.Accel, recorded.Outcome())

	reproduced := 0
	for i := 1; i <= *count; i++ {
		dir, keep, err := replayDir(*artifacts, i, *count)
		if err != nil {
			fmt.Fprintf(os.Stderr, "nbh repro: %v\n", err)
			return exitSetup
		}
		spec.Artifacts = dir
		spec.OnStage = nil
		if !*quiet && *count == 1 {
			spec.OnStage = liveStage(time.Now(), false)
		}
		boot := matrix.Boot
		if *interactive {
			boot = interactiveBoot
		}
		v, spans, qemuStart, err := boot(ctx, opts, spec)
		if err != nil {
			os.RemoveAll(dir)
			fmt.Fprintf(os.Stderr, "nbh repro: %v\n", err)
			if errors.Is(err, images.ErrPinGone) {
				fmt.Fprintln(os.Stderr, "nbh repro: --latest boots the versions this nbh pins instead")
			}
			if ctx.Err() != nil {
				return exitStopped
			}
			return exitSetup
		}
		if ctx.Err() != nil || v.Reason == failure.Interrupted {
			fmt.Printf("replay %d interrupted before its verdict\n", i)
			os.RemoveAll(dir)
			return exitStopped
		}
		same := sameOutcome(recorded, v)
		if same {
			reproduced++
		}
		if *count == 1 {
			fmt.Printf("\n%s", compareTable(recorded, v, spans, qemuStart))
		} else {
			fmt.Printf("run %d/%d: %s (%s)\n", i, *count, outcome(v), map[bool]string{true: "reproduced", false: "DIFFERENT"}[same])
		}
		if keep || !same {
			fmt.Printf("replay artifacts: %s\n", dir)
		} else {
			os.RemoveAll(dir)
		}
	}
	switch {
	case *count > 1:
		fmt.Printf("\nreproduced %d of %d times\n", reproduced, *count)
	case reproduced == 1:
		fmt.Printf("\nREPRODUCED: %s\n", recorded.Outcome())
	default:
		fmt.Printf("\nNOT REPRODUCED: recorded %s\n", recorded.Outcome())
	}
	if reproduced > 0 {
		return exitOK
	}
	return exitFailed
}

// replayDir is where replay i of n keeps its artifacts.
func replayDir(base string, i, n int) (dir string, keep bool, err error) {
	if base == "" {
		dir, err = os.MkdirTemp("", "nbh-repro-")
		return dir, false, err
	}
	dir = base
	if n > 1 {
		dir = filepath.Join(base, fmt.Sprintf("run-%d", i))
	}
	return dir, true, os.MkdirAll(dir, 0o755)
}

// pinsDiffer counts the packages whose versions differ between two pin sets.
func pinsDiffer(a, b images.PinSet) int {
	n := 0
	for name, p := range b.Packages {
		if a.Packages[name] != p {
			n++
		}
	}
	return n
}

// describe is a bundle's boot in the words of nbh boot's flags.
func describe(s bundle.Spec) string {
	parts := []string{s.Arch + "/" + s.Firmware, "guest " + s.Name + " " + s.MAC + " " + s.IP}
	if s.Root != "" {
		parts = append(parts, "root "+s.Root)
	}
	for _, f := range s.Faults {
		parts = append(parts, "fault "+f)
	}
	if s.Kernel != "" || s.Initrd != "" {
		parts = append(parts, "own kernel or archive")
	}
	if s.Append != "" {
		parts = append(parts, "append "+s.Append)
	}
	return strings.Join(parts, ", ")
}

// sameOutcome: the replay ended as recorded — both at the marker, or both
// failed for the same reason at the same stage.
func sameOutcome(rec bundle.Verdict, v harness.Verdict) bool {
	if rec.OK || v.OK {
		return rec.OK == v.OK
	}
	return rec.Reason == string(v.Reason) && rec.Stage == v.Stage.String()
}

func outcome(v harness.Verdict) string {
	if v.OK {
		return "marker"
	}
	return fmt.Sprintf("%s at %s", v.Reason, v.Stage)
}

// compareTable shows the recorded and the replayed verdict side by side:
// outcome, the deciding line, and the time per stage.
func compareTable(rec bundle.Verdict, v harness.Verdict, spans []timeline.Span, start time.Time) string {
	var b strings.Builder
	row := func(k, a, c string) { fmt.Fprintf(&b, "%-9s %-38s %s\n", k, a, c) }
	clip := func(s string) string {
		if len(s) > 38 {
			return s[:35] + "..."
		}
		return s
	}
	row("", "recorded", "replay")
	row("outcome", clip(rec.Outcome()), outcome(v))
	row("line", clip(rec.Line), clip(v.Line))
	recSpan := map[string]bundle.Span{}
	for _, s := range rec.Spans {
		recSpan[s.Stage] = s
	}
	newSpan := map[string]timeline.Span{}
	for _, s := range spans {
		newSpan[s.Stage.String()] = s
	}
	for _, st := range append(append([]string(nil), report.Stages()...), "marker") {
		r, rok := recSpan[st]
		n, nok := newSpan[st]
		if !rok && !nok {
			continue
		}
		a, c := "-", "-"
		if rok {
			a = fmt.Sprintf("%.2fs", r.Seconds)
		}
		if nok {
			c = fmt.Sprintf("%.2fs", n.Duration.Seconds())
		}
		if st == "marker" {
			a, c = map[bool]string{true: "reached", false: "-"}[rok], map[bool]string{true: "reached", false: "-"}[nok]
		}
		row(st, a, c)
	}
	row("total", fmt.Sprintf("%.2fs", rec.Elapsed), fmt.Sprintf("%.2fs", v.Elapsed.Seconds()))
	if rec.Detail != "" || v.Detail != "" {
		fmt.Fprintf(&b, "recorded detail: %s\nreplay detail:   %s\n", rec.Detail, v.Detail)
	}
	return b.String()
}

// liveStage prints each stage as a guest reaches it, with the guest's name
// when several boot (nbh serve). One Fprintf is one write: lines from
// concurrent guests do not mix.
func liveStage(start time.Time, withGuest bool) func(timeline.Event) {
	return func(e timeline.Event) {
		msg := e.Msg
		if len(msg) > 90 {
			msg = msg[:87] + "..."
		}
		guest := ""
		if withGuest {
			guest = fmt.Sprintf("%-9s ", e.Guest)
		}
		fmt.Fprintf(os.Stderr, "  [%7.2fs] %s%-8s %s: %s\n", time.Since(start).Seconds(), guest, e.Stage, e.Source, msg)
	}
}

func bundleCmd(args []string) int {
	fs := flag.NewFlagSet("bundle", flag.ContinueOnError)
	out := fs.String("o", "", "the packed file (default: the folder's name + "+bundle.Ext+", next to it)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: nbh bundle pack [-o FILE] DIR\n\nPacks a repro bundle folder into one %s file to attach to a bug report\n(nbh repro reads either). Mind the secrets it holds: spec.json lists them.\n\nFlags:\n", bundle.Ext)
		fs.PrintDefaults()
	}
	if len(args) == 0 || args[0] != "pack" {
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
			fs.SetOutput(os.Stdout)
			fs.Usage()
			return exitOK
		}
		fs.Usage()
		return exitUsage
	}
	files, code, ok := parseWithFiles(fs, args[1:])
	if !ok {
		return code
	}
	if len(files) != 1 {
		fs.Usage()
		return exitUsage
	}
	dir := filepath.Clean(files[0])
	if !isBundle(dir) {
		fmt.Fprintf(os.Stderr, "nbh bundle: %s is not a bundle folder (no %s)\n", dir, bundle.SpecFile)
		return exitUsage
	}
	if *out == "" {
		*out = dir + bundle.Ext
	}
	if err := bundle.Pack(dir, *out); err != nil {
		fmt.Fprintf(os.Stderr, "nbh bundle: %v\n", err)
		return exitSetup
	}
	fmt.Printf("packed: %s\nreproduce: nbh repro %s\n", *out, *out)
	return exitOK
}
