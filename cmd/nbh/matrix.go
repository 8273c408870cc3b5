package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/warm"
	"nbh.dev/nbh/images"
	"nbh.dev/nbh/internal/sched"
	"nbh.dev/nbh/matrix"
	"nbh.dev/nbh/report"
)

func matrixCmd(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("matrix", flag.ContinueOnError)
	archs := fs.String("arch", os.Getenv("NBH_ARCH"), "comma-separated architectures (default: all; also $NBH_ARCH)")
	fws := fs.String("firmware", os.Getenv("NBH_FIRMWARE"), "comma-separated firmware names (default: all; also $NBH_FIRMWARE)")
	faults := fs.Bool("faults", true, "also boot each chain with each fault that applies to it")
	roots := fs.String("roots", "none,nfs,iscsi,sanboot", "comma-separated roots to boot each chain with: none, nfs, iscsi, sanboot (iPXE chains only)")
	timeout := fs.Duration("timeout", 180*time.Second, "deadline for each boot")
	cache := fs.String("cache", os.Getenv("NBH_CACHE"), "image cache folder (default: $NBH_CACHE, else .cache in the nbh source tree)")
	ipv6 := fs.Bool("ipv6", true, "also boot each chain that can, on the clear network, over IPv6 only (and, with -faults, its no-dhcp) and dual-stack with no root, and over IPv6 only with each NFS or iSCSI root")
	ipsecMode := fs.String("ipsec", "off", "network: off (clear), required (ESP required for the root's services: rows with a network root, and the IPsec faults) or both")
	jobs := fs.Int("j", 0, "rows booted at once (default: $NBH_JOBS, else one per core, plus one under TCG)")
	shard := fs.String("shard", "", "run only shard I/N of the rows (balanced by expected time; every shard computes the same split)")
	list := fs.Bool("list", false, "print the rows (of the shard) with their expected seconds and exit")
	reportDir := fs.String("report", "", "write junit.xml, matrix.json, html/ and artifacts/ into this folder (the other flags override parts)")
	junit := fs.String("junit", "", "write a JUnit XML file: a testcase per row, a failure per failed row")
	jsonOut := fs.String("json", "", "write the JSON report (rows, spans, verdicts, evidence, artifacts, versions)")
	html := fs.String("html", "", "write the HTML report into this folder (index.html, console pages)")
	artifacts := fs.String("artifacts", "", "folder for each row's console.log, timeline.jsonl and network.pcapng (default: REPORT/artifacts, else artifacts/matrix)")
	keep := fs.String("keep-artifacts", "all", "whose artifacts to keep: all, or failed (CI uploads those)")
	warmStart := fs.Bool("warm", false, "warm starts: each machine (chain, NIC, firmware files, QEMU) boots once to its firmware's first request on the network and is saved there (in the image cache, under warm/); every other row of it starts from the snapshot instead of from reset. Rows with no firmware, or whose Secure Boot db holds the lab's own key, start cold; each row's progress line and its start in matrix.json say how it started (README: Warm starts)")
	stackFile := fs.String("stack", "", "your own boot stack: a JSON file of per-architecture slots ({\"amd64\": {\"kernel\": ..., \"initrd\": ..., \"root_dir\": ..., \"loader_config\": {\"ipxe\": ...}, \"expect\": [...]}}; see README); the rows are then your stack across every chain, root and fault of its architectures that applies")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: nbh matrix [flags]

Boots every chain, with each root of -roots, to its marker and, with
-faults, with every fault that applies, and prints a table. Rows run -j at
a time, longest first, each in a lab of its own, with a progress line per
finished row. A fault row passes when the boot fails with the fault's
expected reason (or, for a fault the lab is expected to absorb, reaches its
marker). Exit status 0 when every row passes, 1 otherwise, 2 for bad usage.

Reports: --junit, --json and --html (or --report DIR for all three);
"nbh report" renders and merges JSON reports (CI shards) later.

Flags:
`)
		fs.PrintDefaults()
	}
	if code, ok := parse(fs, args); !ok {
		return code
	}
	sel, err := rowSelect(*archs, *fws, *roots, *ipsecMode, *faults)
	sel.IPv6 = *ipv6 && slices.Contains(sel.Nets, false) && slices.Contains(sel.Roots, harness.RootNone)
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh matrix: %v\n", err)
		return exitUsage
	}
	if *keep != "all" && *keep != "failed" {
		fmt.Fprintf(os.Stderr, "nbh matrix: --keep-artifacts %q: want all or failed\n", *keep)
		return exitUsage
	}
	if *jobs < 0 {
		fmt.Fprintf(os.Stderr, "nbh matrix: -j %d: want 1 or more\n", *jobs)
		return exitUsage
	}
	rows := matrix.Rows(sel)
	var stacks map[string]harness.Stack
	if *stackFile != "" {
		if stacks, err = harness.ReadStacks(*stackFile); err != nil {
			fmt.Fprintf(os.Stderr, "nbh matrix: %v\n", err)
			return exitUsage
		}
		all := len(rows)
		rows = matrix.StackRows(rows, stacks)
		if dropped := all - len(rows); dropped > 0 {
			fmt.Fprintf(os.Stderr, "nbh matrix: %d of %d rows left out: your stack (%s) cannot run them (another architecture; a fault of the reference archive or root, or IPsec, with your archive or root; a NIC the chain's firmware cannot boot from)\n", dropped, all, strings.Join(harness.Arches(stacks), ", "))
		}
		if len(rows) == 0 {
			fmt.Fprintf(os.Stderr, "nbh matrix: the stack (%s) applies to no row of this selection\n", strings.Join(harness.Arches(stacks), ", "))
			return exitUsage
		}
	}
	if *shard != "" {
		i, n, err := matrix.ParseShard(*shard)
		if err == nil {
			rows, err = matrix.Shard(rows, i, n)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "nbh matrix: %v\n", err)
			return exitUsage
		}
	}
	if *list {
		total := 0.0
		for _, r := range matrix.LongestFirst(rows) {
			fmt.Printf("%5.0fs  %s\n", matrix.Estimate(r), r.Label())
			total += matrix.Estimate(r)
		}
		fmt.Printf("%d rows, %.0f s expected serially\n", len(rows), total)
		return exitOK
	}
	if *reportDir != "" {
		set := func(p *string, name string) {
			if *p == "" {
				*p = filepath.Join(*reportDir, name)
			}
		}
		set(junit, "junit.xml")
		set(jsonOut, "matrix.json")
		set(html, "html")
		set(artifacts, "artifacts")
	}
	if *artifacts == "" {
		*artifacts = filepath.Join("artifacts", "matrix")
	}
	n := *jobs
	if n == 0 {
		n = sched.Jobs()
	}
	c := images.Open(*cache)
	var store *warm.Store
	if *warmStart {
		if store, err = warm.Open(filepath.Join(c.Dir, "warm")); err != nil {
			fmt.Fprintf(os.Stderr, "nbh matrix: %v\n", err)
			return exitSetup
		}
	}
	fmt.Fprintf(os.Stderr, "nbh matrix: %d rows, %d at a time (expected about %s)\n", len(rows), n, expectedWall(rows, n))
	start := time.Now()
	results := matrix.Run(ctx, rows, matrix.Config{
		Jobs: n, Timeout: *timeout, Artifacts: *artifacts, KeepPassed: *keep == "all",
		Cache: c, Progress: os.Stderr, Stacks: stacks, Accel: os.Getenv("NBH_ACCEL"), Warm: store,
	})
	wall := time.Since(start)
	code := printMatrix(results, len(rows))
	fmt.Printf("wall time %s with -j %d\n", wall.Round(time.Second), n)

	host, _ := os.Hostname()
	base := "."
	if *jsonOut != "" {
		base = filepath.Dir(*jsonOut)
	}
	rep := matrix.Record(results, report.Run{Host: host, Shard: *shard, Jobs: n, WallSeconds: wall.Seconds()}, c, base, os.Getenv("NBH_ACCEL"))
	if err := writeReports(rep, base, *junit, *jsonOut, *html); err != nil {
		fmt.Fprintf(os.Stderr, "nbh matrix: %v\n", err)
		return exitSetup
	}
	if *reportDir != "" {
		fmt.Printf("report: %s (open %s)\n", *reportDir, filepath.Join(*html, "index.html"))
	}
	if ctx.Err() != nil {
		return exitStopped
	}
	return code
}

// rowSelect reads the flags that choose a matrix's rows (nbh matrix and
// nbh soak share them): chains by arch and firmware, the roots, the
// networks (--ipsec off, required or both) and whether faults are rows.
func rowSelect(archs, fws, roots, ipsecMode string, faults bool) (matrix.Select, error) {
	sel := matrix.Select{Chains: harness.SelectChains(archs, fws), Faults: faults}
	if len(sel.Chains) == 0 {
		return sel, fmt.Errorf("no chain matches --arch %q --firmware %q", archs, fws)
	}
	switch ipsecMode {
	case "off":
		sel.Nets = []bool{false}
	case "required":
		sel.Nets = []bool{true}
	case "both":
		sel.Nets = []bool{false, true}
	default:
		return sel, fmt.Errorf("--ipsec %q: want off, required or both", ipsecMode)
	}
	for _, r := range strings.Split(roots, ",") {
		switch r = strings.TrimSpace(r); r {
		case "none":
			sel.Roots = append(sel.Roots, harness.RootNone)
		case harness.RootNFS, harness.RootISCSI, harness.RootSANBoot:
			sel.Roots = append(sel.Roots, r)
		default:
			return sel, fmt.Errorf("--roots: unknown root %q (none, nfs, iscsi, sanboot)", r)
		}
	}
	return sel, nil
}

// writeReports writes whichever of the three renderings are asked for. rep's
// artifact paths are relative to base.
func writeReports(rep *report.Report, base, junit, jsonOut, html string) error {
	if jsonOut != "" {
		if err := rep.WriteJSON(jsonOut); err != nil {
			return err
		}
		fmt.Printf("json: %s\n", jsonOut)
	}
	// The renderers take artifact paths relative to the current folder.
	cur := *rep
	cur.Rows = append([]report.Row(nil), rep.Rows...)
	cur.Resolve(base)
	if junit != "" {
		if err := cur.WriteJUnit(junit); err != nil {
			return err
		}
		fmt.Printf("junit: %s\n", junit)
	}
	if html != "" {
		if err := cur.WriteHTML(html); err != nil {
			return err
		}
		fmt.Printf("html: %s\n", filepath.Join(html, "index.html"))
	}
	return nil
}

// expectedWall is the rows' expected time spread over n workers.
func expectedWall(rows []matrix.Row, n int) string {
	total := 0.0
	for _, r := range rows {
		total += matrix.Estimate(r)
	}
	return (time.Duration(total/float64(max(n, 1))) * time.Second).Round(time.Second).String()
}

// reportCmd renders (and merges) JSON reports.
func reportCmd(args []string) int {
	fs := flag.NewFlagSet("report", flag.ContinueOnError)
	html := fs.String("html", "", "write the HTML report into this folder")
	junit := fs.String("junit", "", "write a JUnit XML file")
	jsonOut := fs.String("json", "", "write the merged JSON report")
	compare := fs.Bool("compare", false, "compare two reports row by row (A.json B.json: a cold and a warm run): each row's outcome in both, its time in both and the share the second saved; exit status 1 when an outcome differs")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: nbh report [flags] REPORT.json...\n       nbh report --compare A.json B.json\n\nMerges the JSON reports of nbh matrix runs (CI shards) and renders them:\nHTML, JUnit, or one merged JSON. Exit status 0 when every row passed, 1\nwhen one failed, 2 for bad usage or an unreadable report. With --compare,\ncompares two runs row by row instead.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	files, code, ok := parseWithFiles(fs, args)
	if !ok {
		return code
	}
	if *compare {
		return compareReports(files)
	}
	if len(files) == 0 || (*html == "" && *junit == "" && *jsonOut == "") {
		fs.Usage()
		return exitUsage
	}
	var reps []*report.Report
	for _, p := range files {
		r, err := report.ReadJSON(p)
		if err != nil {
			fmt.Fprintf(os.Stderr, "nbh report: %v\n", err)
			return exitUsage
		}
		reps = append(reps, r)
	}
	merged, err := report.Merge(reps...)
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh report: %v\n", err)
		return exitUsage
	}
	// ReadJSON made artifact paths relative to here; a merged JSON stores
	// them relative to its own folder.
	if *jsonOut != "" {
		out := *merged
		out.Rows = append([]report.Row(nil), merged.Rows...)
		out.Rebase(filepath.Dir(*jsonOut))
		if err := out.WriteJSON(*jsonOut); err != nil {
			fmt.Fprintf(os.Stderr, "nbh report: %v\n", err)
			return exitSetup
		}
		fmt.Printf("json: %s\n", *jsonOut)
	}
	if err := writeReports(merged, ".", *junit, "", *html); err != nil {
		fmt.Fprintf(os.Stderr, "nbh report: %v\n", err)
		return exitSetup
	}
	fmt.Printf("%d of %d rows passed\n", len(merged.Rows)-merged.Failed(), len(merged.Rows))
	if merged.Failed() > 0 {
		return exitFailed
	}
	return exitOK
}

// compareReports prints two runs of the matrix row by row.
func compareReports(files []string) int {
	if len(files) != 2 {
		fmt.Fprintf(os.Stderr, "nbh report --compare: want two reports, got %d\n", len(files))
		return exitUsage
	}
	var reps [2]*report.Report
	for i, p := range files {
		r, err := report.ReadJSON(p)
		if err != nil {
			fmt.Fprintf(os.Stderr, "nbh report: %v\n", err)
			return exitUsage
		}
		reps[i] = r
	}
	c := report.Compare(reps[0], reps[1])
	c.Write(os.Stdout, "A", "B")
	if c.Differ > 0 {
		return exitFailed
	}
	return exitOK
}

func printMatrix(results []matrix.Result, planned int) int {
	stages := report.Stages()
	w := len("chain")
	for _, r := range results {
		w = max(w, len(r.Row.Chain())+len(" root=sanboot ipsec"))
	}
	fmt.Printf("\n%-*s %-17s %-5s %8s", w, "chain", "fault", "", "total")
	for _, s := range stages {
		fmt.Printf(" %8s", s)
	}
	fmt.Printf("  outcome\n")
	failed := 0
	for _, res := range results {
		row := res.Row
		name := strings.TrimSuffix(row.Label(), " +"+row.Fault)
		fault := row.Fault
		if fault == "" {
			fault = "-"
		}
		status := "PASS"
		if !res.Pass() {
			status = "FAIL"
			failed++
		}
		fmt.Printf("%-*s %-17s %-5s %7.2fs", w, name, fault, status, res.Verdict.Elapsed.Seconds())
		took := map[string]time.Duration{}
		for _, sp := range res.Spans {
			took[sp.Stage.String()] = sp.Duration
		}
		for _, s := range stages {
			if d, ok := took[s]; ok {
				fmt.Printf(" %7.2fs", d.Seconds())
			} else {
				fmt.Printf(" %8s", "-")
			}
		}
		v := res.Verdict
		switch {
		case res.Err != nil:
			fmt.Printf("  error: %v\n", res.Err)
		case v.OK:
			fmt.Printf("  marker\n")
		default:
			out := fmt.Sprintf("%s at %s", v.Reason, v.Stage)
			if row.Fault != "" && !res.Pass() {
				out += fmt.Sprintf(" (expected %s)", row.Expected())
			}
			fmt.Printf("  %s\n", out)
		}
	}
	for _, res := range results {
		if !res.Pass() && res.Dir != "" && isBundle(res.Dir) {
			fmt.Printf("%s: reproduce: nbh repro %s\n", res.Row.Label(), res.Dir)
		}
	}
	fmt.Printf("\n%d of %d passed", len(results)-failed, len(results))
	if len(results) < planned {
		fmt.Printf(" (%d not run: stopped)", planned-len(results))
		failed++
	}
	fmt.Println()
	if failed > 0 {
		return exitFailed
	}
	return exitOK
}
