package scenarios

import (
	"context"
	"testing"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/qemu"
)

// TestQMP drives a running guest's QEMU over QMP: status, link down and up,
// and quit, after which the guest's verdict says it stopped.
func TestQMP(t *testing.T) {
	guestTest(t)
	lab := nbhtest.NewLab(t)
	// busybox's shell as init: the guest waits at its prompt.
	g, err := lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: qemu.Direct,
		Append: "rdinit=/bin/sh", Expect: `/ # `, Artifacts: nbhtest.Artifacts(t, "g1")})
	assert.NilError(t, err)
	v := g.Wait(context.Background())
	assert.Assert(t, v.OK, "%v", v.Err())
	p := g.Process()
	st, err := p.Status()
	assert.NilError(t, err)
	assert.Equal(t, st, "running")
	assert.NilError(t, p.SetLink(false))
	assert.NilError(t, p.SetLink(true))
	p.Stop()
	select {
	case <-p.Exited():
	default:
		t.Fatal("QEMU still running after Stop")
	}
}
