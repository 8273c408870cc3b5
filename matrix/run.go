package matrix

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/harness/warm"
	"nbh.dev/nbh/images"
	"nbh.dev/nbh/internal/sched"
)

// Result is how one row ended.
type Result struct {
	Row     Row
	Verdict harness.Verdict
	Spans   []timeline.Span
	Err     error  // the lab could not be set up or the guest not started
	Dir     string // the row's artifacts (console.log, timeline.jsonl, network.pcapng); "" when removed
	// Warm is how the row's machine started with Config.Warm
	// (harness.Guest.WarmStart): "warm: ...", "saved: ..." or "cold: why".
	Warm  string
	Start time.Time
	Wall  time.Duration // the whole row: lab set-up, boot, clean-up
}

// Pass reports whether the row showed what it expects.
func (r Result) Pass() bool { return r.Err == nil && r.Row.Pass(r.Verdict) }

// Config is how Run boots the rows.
type Config struct {
	Jobs      int           // rows at once; 0: sched.DefaultJobs()
	Accel     string        // the guests' acceleration (harness.Options.Accel): "" probes
	Timeout   time.Duration // per boot; 0: the harness default
	Artifacts string        // each row's artifacts go to Artifacts/<row ID>; "": not kept
	// KeepPassed keeps the artifacts of rows that passed too (CI keeps
	// only the failed rows').
	KeepPassed bool
	Cache      *images.Cache
	Progress   io.Writer // a line per finished row; nil: none
	// OnResult, if set, is called (serially) with each result as it ends.
	OnResult func(Result)
	// Stacks are the user's own boot stacks by architecture (nbh matrix
	// --stack): each row boots its arch's stack (harness.Stack.Apply).
	Stacks map[string]harness.Stack
	// InOrder boots the rows in the order given instead of longest first
	// (nbh soak interleaves chains, roots and networks on purpose).
	InOrder bool
	// Warm starts each row's machine from a snapshot of its firmware at
	// its first request on the network (harness.Options.Warm), made by the first row of
	// each machine.
	Warm *warm.Store
}

// Run boots rows, Jobs at a time, longest first (unless InOrder), and returns their results
// in the order of rows. A cancelled ctx stops starting rows; rows already
// booting end with ctx's error as their verdict and are returned.
func Run(ctx context.Context, rows []Row, cfg Config) []Result {
	jobs := cfg.Jobs
	if jobs <= 0 {
		jobs = sched.DefaultJobs()
	}
	index := map[string]int{}
	for i, r := range rows {
		index[r.ID()] = i
	}
	results := make([]Result, len(rows))
	done := make([]bool, len(rows))
	order := rows
	if !cfg.InOrder {
		order = LongestFirst(rows)
	}

	var mu sync.Mutex
	finished := 0
	var spentEst, spentReal float64
	totalEst := 0.0
	for _, r := range rows {
		totalEst += Estimate(r)
	}
	start := time.Now()

	work := make(chan Row)
	var wg sync.WaitGroup
	for w := 0; w < jobs; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range work {
				res := runRow(ctx, r, cfg)
				mu.Lock()
				i := index[r.ID()]
				results[i], done[i] = res, true
				finished++
				spentEst += Estimate(r)
				spentReal += res.Wall.Seconds()
				if cfg.Progress != nil {
					status := "PASS"
					if !res.Pass() {
						status = "FAIL"
					}
					elapsed := time.Since(start)
					eta := "?"
					if spentEst > 0 {
						// Remaining expected time, scaled by how the
						// estimates compared with this machine so far,
						// spread over the workers.
						left := (totalEst - spentEst) * (spentReal / spentEst) / float64(jobs)
						eta = (time.Duration(left) * time.Second).Round(time.Second).String()
					}
					how := ""
					if h, _, _ := strings.Cut(res.Warm, ":"); h == "warm" || h == "saved" {
						how = " " + h
					}
					fmt.Fprintf(cfg.Progress, "[%d/%d] %s %s (%.1fs%s)  elapsed %s, ETA %s\n",
						finished, len(rows), status, r.Label(), res.Verdict.Elapsed.Seconds(), how,
						elapsed.Round(time.Second), eta)
				}
				if cfg.OnResult != nil {
					cfg.OnResult(res)
				}
				mu.Unlock()
			}
		}()
	}
feed:
	for _, r := range order {
		select {
		case work <- r:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	var out []Result
	for i, ok := range done {
		if ok {
			out = append(out, results[i])
		}
	}
	return out
}

// runRow boots one row in a lab of its own.
func runRow(ctx context.Context, r Row, cfg Config) Result {
	res := Result{Row: r, Start: time.Now()}
	spec := r.Spec()
	spec.Timeout = cfg.Timeout
	if cfg.Artifacts != "" {
		res.Dir = filepath.Join(cfg.Artifacts, r.ID())
		spec.Artifacts = res.Dir
		os.RemoveAll(res.Dir) // a previous run's files would mislead
	} // else the lab keeps them in its own folder, removed with it
	opts := harness.Options{Cache: cfg.Cache, Accel: cfg.Accel, Warm: cfg.Warm}
	if st, ok := cfg.Stacks[r.Arch]; ok {
		c, _ := harness.LookupChain(r.Arch, r.Firmware)
		st.Apply(c, &spec, &opts.Serve)
		if spec.Kernel != "" {
			// The Secure Boot line is Debian's kernel's words.
			spec.Steps = slices.DeleteFunc(spec.Steps, isSecureBootLine)
		}
	}
	if r.IPsec {
		opts.IPsec = ipsec.Required()
	}
	res.Verdict, res.Spans, _, res.Err = BootWith(ctx, opts, spec, func(g *harness.Guest) harness.Verdict {
		v := g.Wait(ctx)
		res.Warm = g.WarmStart()
		return v
	})
	if res.Pass() && !cfg.KeepPassed && res.Dir != "" {
		os.RemoveAll(res.Dir)
		res.Dir = ""
	}
	res.Wall = time.Since(res.Start)
	return res
}

// Boot boots one guest in a lab of its own and returns its verdict, its
// stage spans and the time QEMU started. The artifacts folder, if the spec
// names one, becomes a repro bundle of the boot.
func Boot(ctx context.Context, opts harness.Options, spec harness.Spec) (harness.Verdict, []timeline.Span, time.Time, error) {
	return BootWith(ctx, opts, spec, func(g *harness.Guest) harness.Verdict { return g.Wait(ctx) })
}

// BootWith is Boot with the wait for the verdict in the caller's hands (an
// interactive session waits for its user).
func BootWith(ctx context.Context, opts harness.Options, spec harness.Spec, wait func(*harness.Guest) harness.Verdict) (harness.Verdict, []timeline.Span, time.Time, error) {
	lab, err := harness.New(opts)
	if err != nil {
		return harness.Verdict{}, nil, time.Time{}, fmt.Errorf("lab: %w", err)
	}
	defer lab.Close()
	if spec.Artifacts != "" {
		if err := os.MkdirAll(spec.Artifacts, 0o755); err != nil {
			return harness.Verdict{}, nil, time.Time{}, err
		}
	}
	g, err := lab.Boot(ctx, spec)
	if err != nil {
		return harness.Verdict{}, nil, time.Time{}, err
	}
	v := wait(g)
	spans := g.Spans()
	g.Close()
	if v.Reason != failure.Interrupted && spec.Artifacts != "" {
		// The artifacts folder is a repro bundle (nbh repro).
		if err := g.WriteBundle(spec.Artifacts, v); err != nil && opts.Log != nil {
			fmt.Fprintf(opts.Log, "lab: %s: no repro bundle: %v\n", g.Name, err)
		}
	}
	return v, spans, g.Start, nil
}

// RunInLab boots rows one after the other in one long-lived lab (made with
// Options.ForgetClosed, so each closed guest leaves nothing behind), each
// guest named "sN" after its place; each is called after each boot. A
// failed row's artifacts folder becomes a repro bundle of its boot (of one
// guest booted alone: the replay boots it in a lab of its own).
func RunInLab(ctx context.Context, lab *harness.Lab, rows []Row, cfg Config, each func(i int, r Result)) []Result {
	var out []Result
	for i, r := range rows {
		if ctx.Err() != nil {
			break
		}
		res := Result{Row: r, Start: time.Now()}
		spec := r.Spec()
		spec.Timeout = cfg.Timeout
		spec.Name = fmt.Sprintf("s%d", i+1)
		if cfg.Artifacts != "" {
			res.Dir = filepath.Join(cfg.Artifacts, r.ID())
			spec.Artifacts = res.Dir
			os.RemoveAll(res.Dir)
			if err := os.MkdirAll(res.Dir, 0o755); err != nil {
				res.Err = err
			}
		}
		if res.Err == nil {
			var g *harness.Guest
			if g, res.Err = lab.Boot(ctx, spec); res.Err == nil {
				res.Verdict = g.Wait(ctx)
				res.Spans = g.Spans()
				g.Close()
				if !res.Pass() && res.Verdict.Reason != failure.Interrupted && res.Dir != "" {
					g.WriteBundle(res.Dir, res.Verdict)
				}
			}
		}
		if res.Pass() && !cfg.KeepPassed && res.Dir != "" {
			os.RemoveAll(res.Dir)
			res.Dir = ""
		}
		res.Wall = time.Since(res.Start)
		if cfg.Progress != nil {
			fmt.Fprintf(cfg.Progress, "[%d/%d] %s: %s\n", i+1, len(rows), r.Label(), outcomeOf(res))
		}
		out = append(out, res)
		if each != nil {
			each(i, res)
		}
	}
	return out
}

// outcomeOf is a result in a few words, for progress lines.
func outcomeOf(res Result) string {
	switch {
	case res.Err != nil:
		return "error: " + res.Err.Error()
	case res.Pass() && res.Verdict.OK:
		return fmt.Sprintf("marker after %.1fs", res.Verdict.Elapsed.Seconds())
	case res.Pass():
		return fmt.Sprintf("%s at %s, as expected", res.Verdict.Reason, res.Verdict.Stage)
	case res.Verdict.OK:
		return "reached the marker, where a failure was expected"
	}
	return res.Verdict.Err().Error()
}
