package netfab

import (
	"testing"
	"time"

	"gotest.tools/v3/assert"
)

// TestLimitPacesAndDrops: a Limit rule's link sends one frame after the
// other at its rate, and drops what would wait longer than its queue holds
// (a router's tail drop), however fast frames come.
func TestLimitPacesAndDrops(t *testing.T) {
	const rate = 100_000 // bytes a second: a 1,000-byte frame takes 10 ms
	r := &ruleState{Rule: Rule{Action: Limit, Rate: rate}}
	var waits []time.Duration
	dropped := 0
	now := time.Now()
	for range 100 { // a burst of 100 frames at once
		w, ok := r.pace(now, 1000)
		if !ok {
			dropped++
			continue
		}
		waits = append(waits, w)
	}
	// The queue holds LimitQueue of the link's time: 25 frames, and the
	// one that found it 250 ms deep.
	assert.Equal(t, len(waits), int(LimitQueue/(10*time.Millisecond))+1)
	assert.Equal(t, dropped, 100-len(waits))
	for i, w := range waits {
		assert.Equal(t, w, time.Duration(i)*10*time.Millisecond, "frame %d", i)
	}
	// Once the link has sent its queue, a frame goes at once again.
	w, ok := r.pace(now.Add(time.Second), 1000)
	assert.Assert(t, ok && w == 0, "%s %v", w, ok)
}
