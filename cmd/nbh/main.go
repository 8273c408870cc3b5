// Command nbh is the netboot harness's command line: boot one guest on the
// reference stack, run the scenario matrix, replay a failed boot from its
// repro bundle, or fetch images.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/failure"
)

const usage = `nbh — the netboot harness

Usage:
  nbh boot   [flags]   boot one guest on the reference network-boot stack
  nbh matrix [flags]   boot every chain x root, with and without faults, -j at a time;
                       print a table (--ipsec required|both: also on a network that
                       requires ESP; --junit, --json, --html or --report DIR: reports;
                       --shard I/N: one CI shard)
  nbh repro  [flags] BUNDLE
                       replay a failed boot from its repro bundle (the artifacts
                       folder a failed boot leaves); --count N for flakes
  nbh bundle pack DIR  pack a bundle folder into one .tar.zst for a bug report
  nbh serve  [flags]   the boot network without a guest: your own QEMU joins it
                       through a unix socket; prints the QEMU command line
  nbh soak   [flags]   boot --boots N guests round-robin across chains, roots and
                       networks; flakes, boots/hour, p50/p95 per chain, and whether
                       files, goroutines or lab folders were left behind
  nbh report [flags] JSON...
                       merge matrix JSON reports (CI shards); render HTML, JUnit
  nbh archive build --root DIR --files LIST --out FILE
                       build a boot archive for your own root tree (nbh's init, the
                       root kernel's modules, the listed files, a manifest)
  nbh images [flags]   fetch and cache kernels, busybox, firmware, loaders and stubs at the
                       pinned versions (--update: pin the current ones; --stock: also
                       build the initramfs-tools and dracut archives)
  nbh help [command]   show help

Boot chains (--arch / --firmware):
%s
Faults (--fault):
%s
Run "nbh boot --help" for the boot flags.
`

func chainsHelp() string {
	var b strings.Builder
	for _, p := range harness.AllChains() {
		fmt.Fprintf(&b, "  %-7s %-13s %s\n", p.Arch, p.Firmware, p.Description)
	}
	return b.String()
}

func faultsHelp() string {
	var b strings.Builder
	for _, n := range harness.FaultNames() {
		f, _ := harness.LookupFault(n)
		var outcomes []string
		for _, r := range f.Outcomes() {
			if r == failure.None {
				outcomes = append(outcomes, "boots")
			} else {
				outcomes = append(outcomes, string(r))
			}
		}
		expect := strings.Join(outcomes, " or ")
		if f.IPsec {
			expect += "; needs --ipsec required"
		}
		fmt.Fprintf(&b, "  %-17s %s (expected: %s)\n", n, f.Help, expect)
	}
	return b.String()
}

func main() {
	os.Exit(run(os.Args[1:]))
}

// exit codes
const (
	exitOK      = 0
	exitFailed  = 1 // the boot failed (classified)
	exitUsage   = 2
	exitSetup   = 3 // the lab could not be set up
	exitStopped = 130
)

func run(args []string) int {
	if len(args) == 0 {
		fmt.Fprintf(os.Stderr, usage, chainsHelp(), faultsHelp())
		return exitUsage
	}
	// SIGINT and SIGTERM cancel the run; the lab then stops QEMU and
	// removes its files before nbh exits.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	switch args[0] {
	case "boot":
		return bootCmd(ctx, args[1:])
	case "images":
		return imagesCmd(ctx, args[1:])
	case "matrix":
		return matrixCmd(ctx, args[1:])
	case "report":
		return reportCmd(args[1:])
	case "repro":
		return reproCmd(ctx, args[1:])
	case "serve":
		return serveCmd(ctx, args[1:])
	case "soak":
		return soakCmd(ctx, args[1:])
	case "bundle":
		return bundleCmd(args[1:])
	case "archive":
		return archiveCmd(ctx, args[1:])
	case "help", "-h", "--help":
		if len(args) > 1 {
			return run([]string{args[1], "--help"})
		}
		fmt.Fprintf(os.Stdout, usage, chainsHelp(), faultsHelp())
		return exitOK
	default:
		fmt.Fprintf(os.Stderr, "nbh: unknown command %q\n\n", args[0])
		fmt.Fprintf(os.Stderr, usage, chainsHelp(), faultsHelp())
		return exitUsage
	}
}

// multiFlag collects a repeatable flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// parseWithFiles parses flags and file arguments in any order (nbh report
// a.json b.json --html dir), returning the files.
func parseWithFiles(fs *flag.FlagSet, args []string) ([]string, int, bool) {
	var files []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, exitOK, false
			}
			return nil, exitUsage, false
		}
		if fs.NArg() == 0 {
			return files, 0, true
		}
		files = append(files, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

func parse(fs *flag.FlagSet, args []string) (int, bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK, false
		}
		return exitUsage, false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "nbh %s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		return exitUsage, false
	}
	return 0, true
}
