// Package sched decides how many guests boot at once and hands out the slots:
// one bound shared by `nbh matrix -j` and the parallel scenarios of `go test`,
// so a test binary never runs more guests than the machine carries.
package sched

import (
	"context"
	"os"
	"runtime"
	"strconv"
	"sync"

	"nbh.dev/nbh/harness/qemu"
)

// Jobs is how many guests the CLI and the scenarios boot at once: $NBH_JOBS
// when set, else DefaultJobs.
func Jobs() int {
	if n, err := strconv.Atoi(os.Getenv("NBH_JOBS")); err == nil && n > 0 {
		return n
	}
	return DefaultJobs()
}

// DefaultJobs is how many guests to boot at once: one per core, plus one
// under TCG. Under TCG a guest keeps about one core busy but spends part of
// each boot waiting (firmware timeouts, DHCP offer collection, retries), so
// one more than the cores keeps both busy; with KVM a guest mostly waits on
// I/O and one per core is plenty.
func DefaultJobs() int {
	cores := runtime.NumCPU()
	if qemu.Probe(runtime.GOARCH).Name == "kvm" {
		return cores
	}
	return cores + 1
}

// Pool hands out at most N slots at a time.
type Pool struct{ slots chan struct{} }

// NewPool makes a pool of n slots (at least one).
func NewPool(n int) *Pool {
	return &Pool{slots: make(chan struct{}, max(n, 1))}
}

// Size is the number of slots.
func (p *Pool) Size() int { return cap(p.slots) }

// Acquire waits for a slot or for ctx's end; release gives the slot back.
func (p *Pool) Acquire(ctx context.Context) (release func(), err error) {
	select {
	case p.slots <- struct{}{}:
		var once sync.Once
		return func() { once.Do(func() { <-p.slots }) }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

var (
	sharedOnce sync.Once
	shared     *Pool
)

// Shared is the process-wide pool of Jobs slots.
func Shared() *Pool {
	sharedOnce.Do(func() { shared = NewPool(Jobs()) })
	return shared
}
