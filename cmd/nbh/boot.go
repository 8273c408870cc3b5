package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"golang.org/x/term"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/bundle"
	"nbh.dev/nbh/harness/dhcp"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/harness/warm"
	"nbh.dev/nbh/images"
	"nbh.dev/nbh/images/stock"
	"nbh.dev/nbh/matrix"
)

func bootCmd(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("boot", flag.ContinueOnError)
	lab := addLabFlags(fs, "boot chain firmware (default: seabios-ipxe for amd64, uboot for arm64)")
	kernel := fs.String("kernel", "", "kernel image (default: the cached Debian kernel)")
	initrd := fs.String("initrd", "", "boot archive: a file, or stock:TOOL ("+strings.Join(stock.Tools(), ", ")+") for one made by that generator for the cached kernel (built once, cached; amd64 hosts build amd64 ones) (default: the reference archive)")
	appendArgs := fs.String("append", "", "extra kernel command line arguments")
	var expects, failOns multiFlag
	fs.Var(&expects, "expect", "regular expression that means success (default: the reference marker NBH-READY, NBH-ROOT-READY with a root); repeatable: an ordered list of console patterns, each a step on the timeline, the last one the success")
	fs.Var(&failOns, "fail-on", "REGEXP=REASON (repeatable): a console line matching REGEXP ends the boot as a failure with REASON (asked before the built-in failure table; a built-in reason's words, such as 'kernel panic', make it that reason)")
	timeout := fs.Duration("timeout", 180*time.Second, "overall deadline for the boot")
	artifacts := fs.String("artifacts", "", "folder for console.log, timeline.jsonl and network.pcapng (default: a temporary folder, kept only if the boot fails)")
	quiet := fs.Bool("quiet", false, "no live progress, only the result")
	keepPrompts := fs.Bool("keep-prompts", false, "let firmware prompts (iPXE's 2 s Ctrl-B wait) run out instead of answering them")
	refresh := fs.String("archive-refresh", "on", "on: the boot server rebuilds the reference archive when a file it copies changes on the guest's NFS root; off: it serves the archive as built")
	onStale := fs.String("on-stale", "stop", "what the reference init does with a stale archive: stop (fail with \"stale boot archive\") or warn (boot on)")
	compression := fs.String("compression", "gzip", "reference archive compression: gzip or zstd")
	signed := fs.Bool("signed", false, "the loader verifies signatures: the lab signs kernel, archive and loader config and builds its key into the loader (arm64 aavmf-grub only)")
	interactive := fs.Bool("interactive", false, "the terminal becomes the guest's serial console (raw mode; Ctrl-] q quits, Ctrl-] d detaches); timeline events show on stderr; the lab keeps serving after the verdict until you quit; the reference init gives a shell when the boot fails (nbh.shell=1 in --append: also after the marker)")
	warmStart := fs.Bool("warm", false, "start the machine from a snapshot of its firmware at its first request on the network (the image cache's warm/; the first boot of a machine makes it): each boot after the first of the same chain, NIC and firmware files skips the firmware's start, as nbh matrix --warm does")
	pack := fs.Bool("pack", false, "when the boot fails, also pack its repro bundle (the artifacts folder) into FOLDER"+bundle.Ext+" for a bug report")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: nbh boot [flags]\n\nBoots one guest on the reference stack and waits for its marker, a\nclassified failure or the deadline. Exit status: 0 marker seen, 1 boot failed\n(the reason is printed), 2 bad usage, 3 the lab could not be set up.\nThe artifacts folder of a failed boot is a repro bundle: nbh repro replays it.\n\nBoot chains:\n%s\nFaults:\n%s\nFlags:\n", chainsHelp(), faultsHelp())
		fs.PrintDefaults()
	}
	if code, ok := parse(fs, args); !ok {
		return code
	}
	prof, opts, spec, err := lab.resolve()
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh boot: %v\n", err)
		return exitUsage
	}
	if *warmStart && *interactive {
		// What the user types before the firmware's first request would
		// be saved into every later boot's machine.
		fmt.Fprintln(os.Stderr, "nbh boot: --warm and --interactive: a machine typed on is not the one the others start; boot it without --warm")
		return exitUsage
	}
	if *warmStart {
		if opts.Warm, err = warm.Open(filepath.Join(opts.Cache.Dir, "warm")); err != nil {
			fmt.Fprintf(os.Stderr, "nbh boot: %v\n", err)
			return exitSetup
		}
	}
	if *interactive && !term.IsTerminal(int(os.Stdin.Fd())) {
		fmt.Fprintln(os.Stderr, "nbh boot: --interactive needs a terminal on standard input")
		return exitUsage
	}
	arch, firmware, cache := lab.arch, lab.firmware, lab.cache
	for _, e := range expects {
		if _, err := regexp.Compile(e); err != nil {
			fmt.Fprintf(os.Stderr, "nbh boot: --expect %q: %v\n", e, err)
			return exitUsage
		}
	}
	if n := len(expects); n > 0 {
		spec.Steps, spec.Expect = expects[:n-1], expects[n-1]
	}
	for _, f := range failOns {
		fo, err := harness.ParseFailOn(f)
		if err != nil {
			fmt.Fprintf(os.Stderr, "nbh boot: --%v\n", err)
			return exitUsage
		}
		spec.FailOn = append(spec.FailOn, fo)
	}
	if *refresh != "on" && *refresh != "off" {
		fmt.Fprintf(os.Stderr, "nbh boot: --archive-refresh %q: want on or off\n", *refresh)
		return exitUsage
	}
	if *onStale != "stop" && *onStale != "warn" {
		fmt.Fprintf(os.Stderr, "nbh boot: --on-stale %q: want stop or warn\n", *onStale)
		return exitUsage
	}
	if *signed && !prof.Verifies {
		fmt.Fprintf(os.Stderr, "nbh boot: --signed: %s's loader cannot verify signatures; only %s can (see README)\n", prof.Name(), strings.Join(harness.VerifyingChains(), ", "))
		return exitUsage
	}
	if *compression != "gzip" && *compression != "zstd" {
		fmt.Fprintf(os.Stderr, "nbh boot: --compression %q: want gzip or zstd\n", *compression)
		return exitUsage
	}
	spec.Kernel, spec.Initrd, spec.Append, spec.Timeout, spec.KeepPrompts = *kernel, *initrd, *appendArgs, *timeout, *keepPrompts
	spec.NoArchiveRefresh, spec.OnStale, spec.Compression, spec.Signed = *refresh == "off", *onStale, *compression, *signed
	stockTool, isStock := strings.CutPrefix(*initrd, "stock:")
	if isStock && spec.Family == dhcp.V6 {
		fmt.Fprintf(os.Stderr, "nbh boot: --initrd %s --ip 6: the stock archives nbh builds bring the network up with IPv4 (ip=dhcp); over IPv6 only the reference archive boots\n", *initrd)
		return exitUsage
	}
	for _, p := range []string{*kernel, *initrd} {
		if p == "" || (isStock && p == *initrd) {
			continue
		}
		if _, err := os.Stat(p); err != nil {
			fmt.Fprintf(os.Stderr, "nbh boot: %v\n", err)
			return exitUsage
		}
	}
	keep := *artifacts != ""
	dir := *artifacts
	if dir == "" {
		var err error
		if dir, err = os.MkdirTemp("", "nbh-boot-"); err != nil {
			fmt.Fprintf(os.Stderr, "nbh boot: %v\n", err)
			return exitSetup
		}
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		fmt.Fprintf(os.Stderr, "nbh boot: %v\n", err)
		return exitSetup
	}
	spec.Artifacts = dir
	if isStock {
		var progress io.Writer = os.Stderr
		if *quiet {
			progress = nil
		}
		a, err := stock.Build(ctx, images.Open(*cache), stockTool, *arch, progress)
		if err != nil {
			fmt.Fprintf(os.Stderr, "nbh boot: --initrd %s: %v\n", *initrd, err)
			if !keep {
				os.RemoveAll(dir)
			}
			switch {
			case ctx.Err() != nil:
				return exitStopped
			case errors.Is(err, stock.ErrUnknownTool), errors.Is(err, stock.ErrForeignArch):
				return exitUsage
			}
			return exitSetup
		}
		spec.Initrd = a.Path
	}

	start := time.Now()
	if !*quiet {
		spec.OnStage = liveStage(start, false)
	}
	fmt.Fprintf(os.Stderr, "nbh: booting %s/%s\n", *arch, *firmware)
	opts.Log = os.Stderr
	if *quiet {
		opts.Log = nil
	}
	boot := matrix.Boot
	if *interactive {
		boot = interactiveBoot
	}
	v, spans, qemuStart, err := boot(ctx, opts, spec)
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh boot: %v\n", err)
		if !keep {
			os.RemoveAll(dir)
		}
		if ctx.Err() != nil {
			return exitStopped
		}
		return exitSetup
	}
	fmt.Printf("\n%s", timeline.Table(spans, qemuStart))
	if v.OK {
		fmt.Printf("\nOK: %s/%s reached the marker in %.2fs\n  %s\n", *arch, *firmware, v.Elapsed.Seconds(), v.Line)
		for _, w := range v.Warnings {
			fmt.Printf("warning: %s\n", w)
		}
		if keep {
			fmt.Printf("artifacts: %s\n", dir)
		} else {
			os.RemoveAll(dir)
		}
		return exitOK
	}
	fmt.Printf("\nFAILED: %s/%s: %v\n", *arch, *firmware, v.Err())
	if len(v.Tail) > 0 {
		fmt.Printf("last console lines:\n")
		for _, l := range v.Tail[max(0, len(v.Tail)-10):] {
			fmt.Printf("  | %s\n", l)
		}
	}
	fmt.Printf("artifacts: %s\n", dir)
	if ctx.Err() != nil || v.Reason == failure.Interrupted {
		return exitStopped
	}
	if isBundle(dir) {
		if *pack {
			if err := bundle.Pack(dir, filepath.Clean(dir)+bundle.Ext); err != nil {
				fmt.Fprintf(os.Stderr, "nbh boot: %v\n", err)
			} else {
				dir = filepath.Clean(dir) + bundle.Ext
			}
		}
		fmt.Printf("reproduce: nbh repro %s\n", dir)
	}
	return exitFailed
}

// updatePins re-resolves the pins of arches, rewrites the source tree's pins
// files, and makes c use them (this binary still has the old ones compiled
// in).
func updatePins(ctx context.Context, c *images.Cache, arches []string) int {
	dir := images.SourceDir()
	if dir == "" {
		fmt.Fprintln(os.Stderr, "nbh images --update: run it inside the nbh source tree (it rewrites images/pins-ARCH.json)")
		return exitUsage
	}
	c.PinsOverride = map[string]images.PinSet{}
	for _, a := range arches {
		s, err := c.Resolve(ctx, a)
		if err != nil {
			fmt.Fprintf(os.Stderr, "nbh images: %v\n", err)
			return exitSetup
		}
		old, _ := images.Pinned(a)
		changed := 0
		for n, p := range s.Packages {
			if o, ok := old.Packages[n]; !ok || o != p {
				fmt.Printf("%s: %s %s -> %s\n", a, n, old.Packages[n].Version, p.Version)
				changed++
			}
		}
		if err := images.WritePins(dir, s); err != nil {
			fmt.Fprintf(os.Stderr, "nbh images: %v\n", err)
			return exitSetup
		}
		fmt.Printf("%s: %d of %d pins changed; wrote %s\n", a, changed, len(s.Packages), filepath.Join(dir, images.PinsFile(a)))
		c.PinsOverride[a] = s
	}
	fmt.Println("rebuild nbh (make build) to compile the new pins in")
	return exitOK
}

func imagesCmd(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("images", flag.ContinueOnError)
	arch := fs.String("arch", "all", strings.Join(images.Arches(), ", ")+" or all")
	cache := fs.String("cache", os.Getenv("NBH_CACHE"), "image cache folder (default: $NBH_CACHE, else .cache in the nbh source tree)")
	withStock := fs.Bool("stock", false, "also build the stock initramfs images ("+strings.Join(stock.Tools(), ", ")+") for the host's architecture, in a throwaway chroot (needs mmdebstrap)")
	update := fs.Bool("update", false, "resolve every package again from the package archive and rewrite the pins (images/pins-ARCH.json in the source tree), then fetch them")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: nbh images [flags]\n\nFetches (once) and lists everything guests boot: Debian kernels and\nmodules, busybox, firmware, loaders and EFI stubs, at the versions pinned\nin images/pins-ARCH.json (PACKAGE@SUITE: from that Debian suite, e.g.\narm64's iPXE from Debian 13). A second run is offline.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if code, ok := parse(fs, args); !ok {
		return code
	}
	arches := images.Arches()
	if *arch != "all" {
		arches = []string{*arch}
	}
	c := images.Open(*cache)
	if *update {
		if code := updatePins(ctx, c, arches); code != exitOK {
			return code
		}
	}
	for _, a := range arches {
		if err := images.FetchAll(ctx, c, a); err != nil {
			fmt.Fprintf(os.Stderr, "nbh images: %v\n", err)
			return exitSetup
		}
		fmt.Printf("%s:\n", a)
		for _, p := range c.Pins(a) {
			fmt.Printf("  %s\n", p)
		}
	}
	if *withStock {
		for _, a := range arches {
			for _, tool := range stock.Tools() {
				ar, err := stock.Build(ctx, c, tool, a, os.Stderr)
				if errors.Is(err, stock.ErrForeignArch) && *arch == "all" {
					continue
				}
				if err != nil {
					fmt.Fprintf(os.Stderr, "nbh images: %v\n", err)
					return exitSetup
				}
				fmt.Printf("stock %s (%s): %s\n", tool, a, ar.Path)
			}
		}
	}
	fmt.Printf("cache: %s\n", c.Dir)
	return exitOK
}
