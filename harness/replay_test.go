package harness

import (
	"bytes"
	"context"
	"testing"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/ipsec"
)

// A replay with the recorded seed, name and MAC makes the same ESP SPIs and
// keys and the same CHAP secret; another seed makes others. Provisioning
// only: no guest boots, but the archive is built from the image cache.
func TestReplayMakesTheSameSecrets(t *testing.T) {
	if testing.Short() {
		t.Skip("builds boot archives from the image cache; skipped with -short")
	}
	secrets := func(seed string) (esp []byte, chap string) {
		l, err := New(Options{IPsec: ipsec.Required(), Seed: seed})
		assert.NilError(t, err)
		defer l.Close()
		g, err := l.Provision(context.Background(), Spec{Arch: "amd64", Firmware: "seabios-ipxe", Root: RootISCSI, CHAP: true,
			Name: "g7", MAC: "52:54:00:4e:42:07"})
		assert.NilError(t, err)
		assert.Assert(t, g.espConf != nil && g.chap != nil)
		return g.espConf, g.chap.Secret
	}
	esp1, chap1 := secrets("recorded")
	esp2, chap2 := secrets("recorded")
	esp3, chap3 := secrets("another")
	assert.Assert(t, bytes.Equal(esp1, esp2), "the replay's ESP keys differ:\n%s\n%s", esp1, esp2)
	assert.Equal(t, chap1, chap2)
	assert.Assert(t, !bytes.Equal(esp1, esp3))
	assert.Assert(t, chap1 != chap3)
}
