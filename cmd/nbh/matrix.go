package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/images"
)

// cell is one boot of the matrix and how it ended.
type cell struct {
	chain  string
	fault  string
	expect failure.Reason
	v      harness.Verdict
	spans  []timeline.Span
	err    error
}

func (c cell) pass() bool {
	if c.err != nil {
		return false
	}
	if c.fault == "" || c.expect == failure.None {
		// No fault, or one the lab is expected to absorb (config-changed,
		// archive-swap): the boot must succeed.
		return c.v.OK
	}
	return !c.v.OK && c.v.Reason == c.expect
}

func matrixCmd(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("matrix", flag.ContinueOnError)
	archs := fs.String("arch", os.Getenv("NBH_ARCH"), "comma-separated architectures (default: all; also $NBH_ARCH)")
	fws := fs.String("firmware", os.Getenv("NBH_FIRMWARE"), "comma-separated firmware names (default: all; also $NBH_FIRMWARE)")
	faults := fs.Bool("faults", true, "also boot each chain with each fault that applies to it")
	roots := fs.String("roots", "none,nfs,iscsi", "comma-separated roots to boot each chain with: none, nfs, iscsi")
	artifacts := fs.String("artifacts", "artifacts/matrix", "folder for each boot's console.log, timeline.jsonl and network.pcapng")
	timeout := fs.Duration("timeout", 180*time.Second, "deadline for each boot")
	cache := fs.String("cache", "", "image cache folder (default: $NBH_CACHE, else .cache in the nbh source tree)")
	ipsecMode := fs.String("ipsec", "off", "network: off (clear), required (ESP required for the root's services: rows with a network root, and the IPsec faults) or both")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: nbh matrix [flags]\n\nBoots every chain, with each root of -roots, to its marker and, with\n-faults, with every fault that applies, one at a time, and prints a\ntable. A fault row passes when the boot fails with the fault's expected reason\n(or, for a fault the lab is expected to absorb, reaches its marker). Exit\nstatus 0 when every row passes, 1 otherwise.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if code, ok := parse(fs, args); !ok {
		return code
	}
	os.Setenv("NBH_ARCH", *archs)
	os.Setenv("NBH_FIRMWARE", *fws)
	chains := harness.Chains()
	if len(chains) == 0 {
		fmt.Fprintf(os.Stderr, "nbh matrix: no chain matches --arch %q --firmware %q\n", *archs, *fws)
		return exitUsage
	}
	type job struct {
		spec  harness.Spec
		ipsec bool
		fault string
		want  failure.Reason
	}
	var nets []bool // ipsec off, required
	switch *ipsecMode {
	case "off":
		nets = []bool{false}
	case "required":
		nets = []bool{true}
	case "both":
		nets = []bool{false, true}
	default:
		fmt.Fprintf(os.Stderr, "nbh matrix: --ipsec %q: want off, required or both\n", *ipsecMode)
		return exitUsage
	}
	var rootList []string
	for _, r := range strings.Split(*roots, ",") {
		switch r = strings.TrimSpace(r); r {
		case "none":
			rootList = append(rootList, harness.RootNone)
		case harness.RootNFS, harness.RootISCSI:
			rootList = append(rootList, r)
		default:
			fmt.Fprintf(os.Stderr, "nbh matrix: --roots: unknown root %q (none, nfs, iscsi)\n", r)
			return exitUsage
		}
	}
	var jobs []job
	once := map[string]bool{}
	for _, esp := range nets {
		for _, p := range chains {
			for _, root := range rootList {
				if esp && root == harness.RootNone {
					continue // nothing is protected before a root
				}
				jobs = append(jobs, job{spec: harness.Spec{Arch: p.Arch, Firmware: p.Firmware, Root: root}, ipsec: esp})
				if !*faults {
					continue
				}
				for _, n := range harness.FaultNames() {
					f := harness.Faults[n]
					// Faults of the boot path run once, with no root (on
					// the clear network); root faults with their root;
					// IPsec faults on the IPsec network only.
					if f.IPsec != esp || !f.Applies(p, root) {
						continue
					}
					if esp {
						// The IPsec faults once per chain, with the first
						// network root they apply to.
						key := p.Name() + " " + n
						if once[key] {
							continue
						}
						once[key] = true
					}
					if esp || root == harness.RootNone || !f.Applies(p, harness.RootNone) {
						jobs = append(jobs, job{spec: harness.Spec{Arch: p.Arch, Firmware: p.Firmware, Root: root, Faults: []harness.Fault{f}}, ipsec: esp, fault: n, want: f.Expect})
					}
				}
			}
		}
	}
	c := images.Open(*cache)
	var cells []cell
	for i, j := range jobs {
		if ctx.Err() != nil {
			break
		}
		name := j.spec.Arch + "/" + j.spec.Firmware
		if j.spec.Root != harness.RootNone {
			name += " root=" + j.spec.Root
		}
		if j.ipsec {
			name += " ipsec"
		}
		label := name
		if j.fault != "" {
			label += " +" + j.fault
		}
		fmt.Fprintf(os.Stderr, "[%d/%d] %s ...", i+1, len(jobs), label)
		j.spec.Timeout = *timeout
		j.spec.Artifacts = filepath.Join(*artifacts, strings.NewReplacer("/", "-", " +", "+", " ", "-", "=", "-").Replace(label))
		res := cell{chain: name, fault: j.fault, expect: j.want}
		opts := harness.Options{Cache: c}
		if j.ipsec {
			opts.IPsec = ipsec.Required()
		}
		res.v, res.spans, _, res.err = bootOnce(ctx, opts, j.spec)
		cells = append(cells, res)
		status := "PASS"
		if !res.pass() {
			status = "FAIL"
		}
		fmt.Fprintf(os.Stderr, " %s (%.1fs)\n", status, res.v.Elapsed.Seconds())
	}
	return printMatrix(cells)
}

// bootOnce boots one guest in a lab of its own and returns its verdict, its
// stage spans and the time QEMU started. log (may be nil) gets the lab's
// progress lines.
func bootOnce(ctx context.Context, opts harness.Options, spec harness.Spec) (harness.Verdict, []timeline.Span, time.Time, error) {
	lab, err := harness.New(opts)
	if err != nil {
		return harness.Verdict{}, nil, time.Time{}, fmt.Errorf("lab: %w", err)
	}
	defer lab.Close()
	if err := os.MkdirAll(spec.Artifacts, 0o755); err != nil {
		return harness.Verdict{}, nil, time.Time{}, err
	}
	g, err := lab.Boot(ctx, spec)
	if err != nil {
		return harness.Verdict{}, nil, time.Time{}, err
	}
	v := g.Wait(ctx)
	spans := g.Spans()
	g.Close()
	return v, spans, g.Start, nil
}

func printMatrix(cells []cell) int {
	stages := []timeline.Stage{timeline.Firmware, timeline.DHCP, timeline.Loader, timeline.Kernel, timeline.Init, timeline.Root}
	w := len("chain")
	for _, c := range cells {
		w = max(w, len(c.chain))
	}
	fmt.Printf("\n%-*s %-17s %-5s %8s", w, "chain", "fault", "", "total")
	for _, s := range stages {
		fmt.Printf(" %8s", s)
	}
	fmt.Printf("  outcome\n")
	failed := 0
	for _, c := range cells {
		fault := c.fault
		if fault == "" {
			fault = "-"
		}
		status := "PASS"
		if !c.pass() {
			status = "FAIL"
			failed++
		}
		fmt.Printf("%-*s %-17s %-5s %7.2fs", w, c.chain, fault, status, c.v.Elapsed.Seconds())
		took := map[timeline.Stage]time.Duration{}
		for _, sp := range c.spans {
			took[sp.Stage] = sp.Duration
		}
		for _, s := range stages {
			if d, ok := took[s]; ok {
				fmt.Printf(" %7.2fs", d.Seconds())
			} else {
				fmt.Printf(" %8s", "-")
			}
		}
		switch {
		case c.err != nil:
			fmt.Printf("  error: %v\n", c.err)
		case c.v.OK:
			fmt.Printf("  marker\n")
		default:
			out := fmt.Sprintf("%s at %s", c.v.Reason, c.v.Stage)
			if c.fault != "" && !c.pass() {
				out += fmt.Sprintf(" (expected %s)", c.expect)
			}
			fmt.Printf("  %s\n", out)
		}
	}
	fmt.Printf("\n%d of %d passed\n", len(cells)-failed, len(cells))
	if failed > 0 {
		return exitFailed
	}
	return exitOK
}
