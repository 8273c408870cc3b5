package main

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/matrix"
)

// A long-lived lab must stay flat: what a boot takes, its Close gives
// back. soak --one-lab boots every row in one lab and samples the process
// after each boot; the peak over all boots must stay within a small bound
// of the peak over the first ones (which include the lab's own warm-up:
// image cache, archive builds, service pools).

// flatBase is how many first boots set the bound.
const flatBase = 10

// footprint is the process after one boot (and a garbage collection).
type footprint struct {
	n           int     // how many boots the peak is over
	RSSMiB      float64 `json:"rss_mib"`
	HeapMiB     float64 `json:"heap_mib"`
	Goroutines  int     `json:"goroutines"`
	FDs         int     `json:"fds"`
	Events      int     `json:"timeline_events"`
	Subscribers int     `json:"timeline_subscribers"`
}

// flatness is soak --one-lab's judgement.
type flatness struct {
	Samples []footprint `json:"samples"`
	Base    footprint   `json:"first_boots_peak"`
	Peak    footprint   `json:"peak"`
	Growth  []string    `json:"growth"` // what grew past its bound
}

func sample(lab *harness.Lab) footprint {
	runtime.GC()
	debug.FreeOSMemory()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	fds, _ := os.ReadDir("/proc/self/fd")
	return footprint{RSSMiB: statusMiB("VmRSS"), HeapMiB: float64(ms.HeapInuse) / (1 << 20), Goroutines: runtime.NumGoroutine(),
		FDs: len(fds), Events: len(lab.Timeline().Events("")), Subscribers: lab.Timeline().Subscribers()}
}

func peakOf(s []footprint) footprint {
	var p footprint
	for _, f := range s {
		p.RSSMiB, p.HeapMiB = max(p.RSSMiB, f.RSSMiB), max(p.HeapMiB, f.HeapMiB)
		p.Goroutines, p.FDs = max(p.Goroutines, f.Goroutines), max(p.FDs, f.FDs)
		p.Events, p.Subscribers = max(p.Events, f.Events), max(p.Subscribers, f.Subscribers)
	}
	p.n = len(s)
	return p
}

// judge compares the peak of all boots with the first boots' peak. The
// bounds allow for noise (a garbage collector's timing, a connection still
// closing), not for a per-boot leak: 100 boots leaking a goroutine, a file
// or a subscriber each, or 100 KiB of heap each, cross them.
func judge(s []footprint) *flatness {
	f := &flatness{Samples: s, Base: peakOf(s[:min(flatBase, len(s))]), Peak: peakOf(s), Growth: []string{}}
	check := func(what string, base, peak, slack float64) {
		if peak > base+slack {
			f.Growth = append(f.Growth, fmt.Sprintf("%s grew from %.0f (first %d boots' peak) to %.0f over %d boots", what, base, f.Base.n, peak, len(s)))
		}
	}
	check("RSS (MiB)", f.Base.RSSMiB, f.Peak.RSSMiB, 16+f.Base.RSSMiB/10)
	check("heap in use (MiB)", f.Base.HeapMiB, f.Peak.HeapMiB, 8+f.Base.HeapMiB/10)
	check("goroutines", float64(f.Base.Goroutines), float64(f.Peak.Goroutines), 10)
	check("open files", float64(f.Base.FDs), float64(f.Peak.FDs), 5)
	check("timeline events", float64(f.Base.Events), float64(f.Peak.Events), 50)
	check("timeline subscribers", float64(f.Base.Subscribers), float64(f.Peak.Subscribers), 0)
	return f
}

// soakOneLab boots rows one after the other in one lab that forgets its
// closed guests, sampling the process after each boot.
func soakOneLab(ctx context.Context, rows []matrix.Row, cfg matrix.Config, esp bool) ([]matrix.Result, *flatness, error) {
	opts := harness.Options{Cache: cfg.Cache, ForgetClosed: true, Accel: cfg.Accel}
	if esp {
		opts.IPsec = ipsec.Required()
	}
	lab, err := harness.New(opts)
	if err != nil {
		return nil, nil, fmt.Errorf("lab: %w", err)
	}
	defer lab.Close()
	var samples []footprint
	results := matrix.RunInLab(ctx, lab, rows, cfg, func(int, matrix.Result) { samples = append(samples, sample(lab)) })
	if len(samples) == 0 {
		return results, nil, nil
	}
	return results, judge(samples), nil
}
