package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"nbh.dev/nbh/images"
	"nbh.dev/nbh/internal/sched"
	"nbh.dev/nbh/matrix"
)

// soakCmd boots many guests in turn across chains, roots and networks and
// says whether anything flaked or leaked.
func soakCmd(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("soak", flag.ContinueOnError)
	boots := fs.Int("boots", 200, "how many boots in all")
	jobs := fs.Int("j", 0, "boots at once (default: $NBH_JOBS, else one per core, plus one under TCG)")
	archs := fs.String("arch", os.Getenv("NBH_ARCH"), "comma-separated architectures (default: all; also $NBH_ARCH)")
	fws := fs.String("firmware", os.Getenv("NBH_FIRMWARE"), "comma-separated firmware names (default: all; also $NBH_FIRMWARE)")
	roots := fs.String("roots", "none,nfs,iscsi", "comma-separated roots to rotate through: none, nfs, iscsi")
	ipsecMode := fs.String("ipsec", "both", "networks to rotate through: off (clear), required, or both")
	faults := fs.Bool("faults", false, "rotate through each chain's faults too (each checked against its expected reason)")
	timeout := fs.Duration("timeout", 180*time.Second, "deadline for each boot")
	artifacts := fs.String("artifacts", "", "folder for the artifacts (and repro bundles) of unexpected verdicts (default: a new folder in the temporary folder)")
	jsonOut := fs.String("json", "", "also write the summary as JSON to this file")
	cache := fs.String("cache", os.Getenv("NBH_CACHE"), "image cache folder (default: $NBH_CACHE, else .cache in the nbh source tree)")
	oneLab := fs.Bool("one-lab", false, "boot the guests one after the other in one long-lived lab (closed guests forgotten, as nbh serve's), and check that the process stays flat: its RSS, heap, goroutines, open files and timeline after every boot within a small bound of the first 10 boots' peak (one network: --ipsec off or required)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: nbh soak [flags]

Boots --boots guests, -j at a time, each in a lab of its own, round-robin
across the chains, roots and networks selected (the rows of nbh matrix,
without faults unless --faults), and checks every verdict against what its
row expects. Every unexpected verdict is a flake, kept with its repro
bundle. At the end it prints boots per hour, the time to marker per chain
(p50, p95), the nbh process's peak RSS, and its open files, goroutines and
lab folders before and after: they must come back to where they started.
With --one-lab every boot is in one lab, one at a time, and the process
must also stay flat from boot to boot. Exit status 0 with no flake and
nothing left behind (and, with --one-lab, flat), 1 otherwise, 2 for bad
usage, 130 when interrupted.

Flags:
`)
		fs.PrintDefaults()
	}
	if code, ok := parse(fs, args); !ok {
		return code
	}
	if *boots < 1 || *jobs < 0 {
		fmt.Fprintf(os.Stderr, "nbh soak: --boots %d -j %d: want 1 or more boots, and -j 1 or more\n", *boots, *jobs)
		return exitUsage
	}
	if *oneLab {
		set := false
		fs.Visit(func(f *flag.Flag) { set = set || f.Name == "ipsec" })
		switch {
		case !set:
			*ipsecMode = "off" // one lab is one network
		case *ipsecMode == "both":
			fmt.Fprintln(os.Stderr, "nbh soak: --one-lab boots in one lab, on one network: --ipsec off or required")
			return exitUsage
		}
	}
	sel, err := rowSelect(*archs, *fws, *roots, *ipsecMode, *faults)
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh soak: %v\n", err)
		return exitUsage
	}
	distinct := matrix.Rows(sel)
	if len(distinct) == 0 {
		fmt.Fprintln(os.Stderr, "nbh soak: no row to boot (an IPsec network needs a network root)")
		return exitUsage
	}
	rows := soakRows(distinct, *boots)
	n := *jobs
	if n == 0 {
		n = sched.Jobs()
	}
	if *oneLab {
		n = 1 // one lab, one guest at a time
	}
	if *artifacts == "" {
		dir, err := os.MkdirTemp("", "nbh-soak-")
		if err != nil {
			fmt.Fprintf(os.Stderr, "nbh soak: %v\n", err)
			return exitSetup
		}
		*artifacts = dir
	}

	// Go's network poller opens its epoll and event descriptors on first
	// use and keeps them: open it now, so the baseline has them.
	if ln, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		ln.Close()
	}
	before := measure()
	fmt.Fprintf(os.Stderr, "nbh soak: %d boots over %d rows, %d at a time; unexpected verdicts kept in %s\n", len(rows), len(distinct), n, *artifacts)
	start := time.Now()
	cfg := matrix.Config{Jobs: n, Timeout: *timeout, Artifacts: *artifacts, Cache: images.Open(*cache), Progress: os.Stderr, InOrder: true,
		Accel: os.Getenv("NBH_ACCEL")}
	var results []matrix.Result
	var flat *flatness
	if *oneLab {
		var err error
		if results, flat, err = soakOneLab(ctx, rows, cfg, *ipsecMode == "required"); err != nil {
			fmt.Fprintf(os.Stderr, "nbh soak: %v\n", err)
			return exitSetup
		}
	} else {
		results = matrix.Run(ctx, rows, cfg)
	}
	wall := time.Since(start)
	after := settle(before)

	sum := summarize(results, wall, n, before, after)
	if flat != nil {
		sum.OneLab = flat
		sum.Leaks = append(sum.Leaks, flat.Growth...)
	}
	printSoak(sum)
	if *jsonOut != "" {
		b, _ := json.MarshalIndent(sum, "", "  ")
		if err := os.WriteFile(*jsonOut, append(b, '\n'), 0o644); err != nil {
			fmt.Fprintf(os.Stderr, "nbh soak: %v\n", err)
			return exitSetup
		}
	}
	switch {
	case ctx.Err() != nil:
		return exitStopped
	case len(sum.Flakes) > 0 || len(sum.Leaks) > 0:
		return exitFailed
	}
	return exitOK
}

// soakRows is n boots taking the rows in turn.
func soakRows(rows []matrix.Row, n int) []matrix.Row {
	out := make([]matrix.Row, n)
	for i := range out {
		r := rows[i%len(rows)]
		r.Rep = i / len(rows)
		out[i] = r
	}
	return out
}

// resourceUse is what the soak watches of its own process.
type resourceUse struct {
	FDs        int `json:"fds"`
	Goroutines int `json:"goroutines"`
	LabFolders int `json:"lab_folders"` // this process's nbh-lab-PID-* in the temporary folder
}

func measure() resourceUse {
	fds, _ := os.ReadDir("/proc/self/fd")
	labs, _ := filepath.Glob(filepath.Join(os.TempDir(), fmt.Sprintf("nbh-lab-%d-*", os.Getpid())))
	return resourceUse{FDs: len(fds), Goroutines: runtime.NumGoroutine(), LabFolders: len(labs)}
}

// settle measures after the run, giving closing connections and
// goroutines a few seconds to end before calling anything a leak.
func settle(before resourceUse) resourceUse {
	var u resourceUse
	for i := 0; i < 20; i++ {
		runtime.GC()
		u = measure()
		if u.FDs <= before.FDs && u.Goroutines <= before.Goroutines && u.LabFolders <= before.LabFolders {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	return u
}

// peakRSS is the process's high-water resident set (VmHWM), in MiB.
func peakRSS() float64 { return statusMiB("VmHWM") }

// statusMiB is a size the kernel reports in /proc/self/status (VmHWM,
// VmRSS), in MiB.
func statusMiB(field string) float64 {
	b, _ := os.ReadFile("/proc/self/status")
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return float64(kb) / 1024
		}
	}
	return 0
}

type chainSoak struct {
	Chain  string  `json:"chain"`
	Boots  int     `json:"boots"`
	Flakes int     `json:"flakes"`
	P50    float64 `json:"p50_seconds_to_marker"`
	P95    float64 `json:"p95_seconds_to_marker"`
}

type flake struct {
	Row     string `json:"row"`
	Verdict string `json:"verdict"`
	Repro   string `json:"repro,omitempty"`
}

type soakSummary struct {
	Boots        int         `json:"boots"`
	Jobs         int         `json:"jobs"`
	WallSeconds  float64     `json:"wall_seconds"`
	BootsPerHour float64     `json:"boots_per_hour"`
	PeakRSSMiB   float64     `json:"peak_rss_mib"`
	Before       resourceUse `json:"before"`
	After        resourceUse `json:"after"`
	Chains       []chainSoak `json:"chains"`
	Flakes       []flake     `json:"flakes"`
	Leaks        []string    `json:"leaks"`
	OneLab       *flatness   `json:"one_lab,omitempty"`
}

func summarize(results []matrix.Result, wall time.Duration, jobs int, before, after resourceUse) soakSummary {
	s := soakSummary{Boots: len(results), Jobs: jobs, WallSeconds: wall.Seconds(), PeakRSSMiB: peakRSS(),
		Before: before, After: after, Flakes: []flake{}, Leaks: []string{}}
	if wall > 0 {
		s.BootsPerHour = float64(len(results)) / wall.Hours()
	}
	byChain := map[string]*chainSoak{}
	times := map[string][]float64{}
	for _, r := range results {
		c := byChain[r.Row.Chain()]
		if c == nil {
			c = &chainSoak{Chain: r.Row.Chain()}
			byChain[r.Row.Chain()] = c
		}
		c.Boots++
		if !r.Pass() {
			c.Flakes++
			v := r.Verdict.Err()
			verdict := "reached the marker, where a failure was expected"
			if r.Err != nil {
				verdict = r.Err.Error()
			} else if v != nil {
				verdict = v.Error()
			}
			f := flake{Row: r.Row.Label(), Verdict: verdict}
			if r.Dir != "" {
				f.Repro = "nbh repro " + r.Dir
			}
			s.Flakes = append(s.Flakes, f)
			continue
		}
		if r.Verdict.OK {
			times[c.Chain] = append(times[c.Chain], r.Verdict.Elapsed.Seconds())
		}
	}
	for name, c := range byChain {
		t := times[name]
		sort.Float64s(t)
		c.P50, c.P95 = percentile(t, 50), percentile(t, 95)
		s.Chains = append(s.Chains, *c)
	}
	slices.SortFunc(s.Chains, func(a, b chainSoak) int { return strings.Compare(a.Chain, b.Chain) })
	if after.FDs > before.FDs {
		s.Leaks = append(s.Leaks, fmt.Sprintf("open files: %d before, %d after", before.FDs, after.FDs))
	}
	if after.Goroutines > before.Goroutines {
		s.Leaks = append(s.Leaks, fmt.Sprintf("goroutines: %d before, %d after", before.Goroutines, after.Goroutines))
	}
	if after.LabFolders > before.LabFolders {
		s.Leaks = append(s.Leaks, fmt.Sprintf("lab folders: %d before, %d after", before.LabFolders, after.LabFolders))
	}
	return s
}

// percentile of sorted values (nearest rank); 0 for none.
func percentile(sorted []float64, p int) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := (p*len(sorted) + 99) / 100
	return sorted[max(i, 1)-1]
}

func printSoak(s soakSummary) {
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "CHAIN\tBOOTS\tFLAKES\tP50 TO MARKER\tP95 TO MARKER")
	for _, c := range s.Chains {
		fmt.Fprintf(w, "%s\t%d\t%d\t%.1fs\t%.1fs\n", c.Chain, c.Boots, c.Flakes, c.P50, c.P95)
	}
	w.Flush()
	fmt.Printf("%d boots in %s with -j %d: %.0f boots/hour; nbh's peak RSS %.0f MiB\n",
		s.Boots, (time.Duration(s.WallSeconds) * time.Second).Round(time.Second), s.Jobs, s.BootsPerHour, s.PeakRSSMiB)
	fmt.Printf("before: %d open files, %d goroutines, %d lab folders; after: %d, %d, %d\n",
		s.Before.FDs, s.Before.Goroutines, s.Before.LabFolders, s.After.FDs, s.After.Goroutines, s.After.LabFolders)
	for _, f := range s.Flakes {
		fmt.Printf("FLAKE %s: %s", f.Row, f.Verdict)
		if f.Repro != "" {
			fmt.Printf("; reproduce: %s", f.Repro)
		}
		fmt.Println()
	}
	if f := s.OneLab; f != nil {
		fmt.Printf("one lab, %d boots: first %d boots' peak / all boots' peak: RSS %.0f / %.0f MiB, heap %.0f / %.0f MiB, goroutines %d / %d, open files %d / %d, timeline events %d / %d, subscribers %d / %d\n",
			len(f.Samples), f.Base.n, f.Base.RSSMiB, f.Peak.RSSMiB, f.Base.HeapMiB, f.Peak.HeapMiB, f.Base.Goroutines, f.Peak.Goroutines,
			f.Base.FDs, f.Peak.FDs, f.Base.Events, f.Peak.Events, f.Base.Subscribers, f.Peak.Subscribers)
	}
	for _, l := range s.Leaks {
		fmt.Printf("LEAK %s\n", l)
	}
	if len(s.Flakes) == 0 && len(s.Leaks) == 0 {
		fmt.Println("no flake, nothing left behind")
	}
}
