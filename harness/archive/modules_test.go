package archive

import (
	"context"
	"os"
	"testing"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/images"
)

// TestClosureDebianVirtio resolves the virtio-net set from a real Debian
// kernel's own .modinfo data: dependencies come before their users.
func TestClosureDebianVirtio(t *testing.T) {
	for _, arch := range images.Arches() {
		t.Run(arch, func(t *testing.T) {
			k, err := images.Open(os.Getenv("NBH_CACHE")).Kernel(context.Background(), arch)
			assert.NilError(t, err)
			idx, err := IndexModules(k.Modules)
			assert.NilError(t, err)
			mods, err := idx.Closure([]string{"virtio_pci", "virtio_net"})
			assert.NilError(t, err)
			pos := map[string]int{}
			for i, m := range mods {
				pos[m.Name] = i
			}
			assert.Equal(t, mods[len(mods)-1].Name, "virtio_net")
			for _, m := range mods {
				for _, d := range m.Depends {
					assert.Assert(t, pos[d] < pos[m.Name], "%s loads before its dependency %s", m.Name, d)
				}
			}
			_, ok := pos["net_failover"]
			assert.Assert(t, ok, "net_failover is a dependency of virtio_net: %v", mods)
			t.Logf("%v", mods)
		})
	}
}
