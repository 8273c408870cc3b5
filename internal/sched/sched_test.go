package sched

import (
	"context"
	"runtime"
	"testing"
	"time"

	"gotest.tools/v3/assert"
)

func TestPoolBoundsAndReleases(t *testing.T) {
	p := NewPool(2)
	assert.Equal(t, p.Size(), 2)
	r1, err := p.Acquire(context.Background())
	assert.NilError(t, err)
	r2, err := p.Acquire(context.Background())
	assert.NilError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err = p.Acquire(ctx)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	r1()
	r1() // twice is once
	r3, err := p.Acquire(context.Background())
	assert.NilError(t, err)
	r2()
	r3()
	assert.Equal(t, len(p.slots), 0)
}

func TestJobsFromEnvironment(t *testing.T) {
	t.Setenv("NBH_JOBS", "5")
	assert.Equal(t, Jobs(), 5)
	assert.Assert(t, DefaultJobs() != 5 || runtime.NumCPU() >= 4, "DefaultJobs reads no environment")
	t.Setenv("NBH_JOBS", "0")
	assert.Equal(t, Jobs(), DefaultJobs())
	assert.Assert(t, DefaultJobs() >= 1)
	assert.Equal(t, NewPool(0).Size(), 1)
}
