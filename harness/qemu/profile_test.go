package qemu

import (
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"
)

func TestKVMOnlyForTheHostArch(t *testing.T) {
	other := "arm64"
	if hostArch() == "arm64" {
		other = "amd64"
	}
	assert.Equal(t, Probe(other).Name, "tcg")
	t.Setenv("NBH_ACCEL", "tcg")
	assert.Equal(t, Probe(hostArch()).Name, "tcg")
}

// The KVM probe's guests really run and print: here under TCG (the probe
// itself asks for KVM), so a probe that passes has seen guest code run.
func TestProbeGuestsPrint(t *testing.T) {
	if testing.Short() {
		t.Skip("runs QEMU; skipped with -short")
	}
	for _, arch := range []string{"amd64", "arm64"} {
		ran, why := probeGuest(arch, Accel{Name: "tcg"}, 20*time.Second)
		assert.Assert(t, ran, "%s: %s", arch, why)
	}
	// Silence until the limit is no success.
	ran, why := probeGuest("amd64", Accel{Name: "tcg"}, time.Millisecond)
	assert.Assert(t, !ran)
	assert.Assert(t, strings.Contains(why, "no guest output within"), why)
}
