package archive

import (
	"bytes"
	"context"
	"debug/elf"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ulikunitz/xz"

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
			idx.Cache = t.TempDir() // Debian's: compressed modules are read
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

// TestCompressedModules: Debian 13's kernels ship modules compressed with
// xz (riscv64's here); the index finds them, dependencies come from their
// decompressed .modinfo, and the archive carries each one plain, named .ko:
// an ELF module whose .modinfo names it and whose signature is still
// appended (what the kernel checks under lockdown).
func TestCompressedModules(t *testing.T) {
	k, err := images.Open(os.Getenv("NBH_CACHE")).Kernel(context.Background(), "riscv64")
	assert.NilError(t, err)
	idx, err := IndexModules(k.Modules)
	assert.NilError(t, err)
	idx.Cache = t.TempDir()
	assert.Equal(t, idx.Arch(), "riscv64")
	mods, err := idx.Closure([]string{"nfsv3"})
	assert.NilError(t, err)
	assert.Assert(t, len(mods) > 1, "%v", mods)
	for _, m := range mods {
		assert.Assert(t, strings.HasSuffix(m.Path, ".ko.xz"), m.Path)
	}
	b := New()
	assert.NilError(t, b.AddModules(idx, "6.12-test", mods, "etc/nbh/modules"))
	for _, m := range mods {
		p := "lib/modules/6.12-test/" + strings.TrimSuffix(m.Path, ".xz")
		e := b.entries[p]
		assert.Assert(t, e != nil, "%s is not in the archive", p)
		f, err := elf.NewFile(bytes.NewReader(e.data))
		assert.NilError(t, err, p)
		info := f.Section(".modinfo")
		assert.Assert(t, info != nil, p)
		data, err := info.Data()
		assert.NilError(t, err)
		assert.Assert(t, bytes.Contains(data, []byte("\x00name="+m.Name+"\x00")) || bytes.HasPrefix(data, []byte("name="+m.Name+"\x00")), "%s: .modinfo names another module", p)
		assert.Assert(t, bytes.HasSuffix(e.data, []byte("~Module signature appended~\n")), "%s: no signature", p)
		// Kept decompressed for the next build: the module's bytes.
		kept, err := os.ReadFile(filepath.Join(idx.Cache, strings.TrimSuffix(m.Path, ".xz")))
		assert.NilError(t, err)
		fresh, err := readModule(filepath.Join(k.Modules, m.Path))
		assert.NilError(t, err)
		assert.Assert(t, bytes.Equal(kept, fresh) && bytes.Equal(e.data, fresh), p)
	}
	// A broken kept copy is decompressed again, not used.
	first := mods[0]
	keptPath := filepath.Join(idx.Cache, strings.TrimSuffix(first.Path, ".xz"))
	assert.NilError(t, os.WriteFile(keptPath, []byte("not a module"), 0o644))
	idx2, err := IndexModules(k.Modules)
	assert.NilError(t, err)
	idx2.Cache = idx.Cache
	data, err := idx2.read(first.Path)
	assert.NilError(t, err)
	assert.Assert(t, bytes.Equal(data, b.entries["lib/modules/6.12-test/"+strings.TrimSuffix(first.Path, ".xz")].data))
	// Without a cache (a root of the user's) compressed modules are refused.
	idx3, err := IndexModules(k.Modules)
	assert.NilError(t, err)
	_, err = idx3.Closure([]string{"nfsv3"})
	assert.ErrorContains(t, err, "give your root's modules plain")
	list := string(b.entries["etc/nbh/modules"].data)
	assert.Assert(t, strings.HasSuffix(strings.TrimSpace(list), "/nfsv3.ko"), list)
}

// A compressed module that inflates past the bound is refused, not read
// into memory whole.
func TestCompressedModuleBomb(t *testing.T) {
	defer func(old int64) { maxModule = old }(maxModule)
	maxModule = 4 << 20 // (the real bound, 256 MiB, takes long to write)
	dir := t.TempDir()
	p := filepath.Join(dir, "kernel", "bomb.ko.xz")
	assert.NilError(t, os.MkdirAll(filepath.Dir(p), 0o755))
	f, err := os.Create(p)
	assert.NilError(t, err)
	w, err := xz.NewWriter(f)
	assert.NilError(t, err)
	zero := make([]byte, 1<<20)
	for i := int64(0); i < maxModule>>20+1; i++ {
		_, err := w.Write(zero)
		assert.NilError(t, err)
	}
	assert.NilError(t, w.Close())
	assert.NilError(t, f.Close())
	_, err = Depends(p)
	assert.ErrorContains(t, err, "larger than")
}
