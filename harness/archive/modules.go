package archive

import (
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// ModuleList is where the init finds the modules to load at start, in order;
// lists for later needs (ModuleList + ".nfs") sit beside it.
const ModuleList = "etc/nbh/modules"

// Module is one kernel module file.
type Module struct {
	Name    string   // canonical name (underscores)
	Path    string   // relative to the modules folder, e.g. kernel/net/core/failover.ko (or .ko.xz, .ko.zst)
	Depends []string // canonical names
}

// moduleExts are the module file names a kernel package may ship: plain,
// or compressed as a whole (Debian 13's kernels: xz).
var moduleExts = []string{".ko", ".ko.xz", ".ko.zst"}

// isModule: a module file's name, plain or compressed.
func isModule(p string) bool {
	for _, e := range moduleExts {
		if strings.HasSuffix(p, e) {
			return true
		}
	}
	return false
}

// plainPath is a module's path with its compression suffix dropped: the
// archive carries every module plain, so the init loads each one the same
// way, whatever the kernel was built to decompress.
func plainPath(p string) string {
	return strings.TrimSuffix(strings.TrimSuffix(p, ".xz"), ".zst")
}

// ModuleName canonicalises a module name: the kernel treats - and _ alike.
func ModuleName(s string) string {
	s = strings.TrimSuffix(plainPath(filepath.Base(s)), ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

// maxModule bounds a module as read, decompressed: Linux's largest are
// tens of MiB, and a root of the user's could hold a compression bomb.
var maxModule int64 = 256 << 20

// readModule reads a module file, decompressing an .xz or .zst one.
func readModule(file string) ([]byte, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var r io.Reader = f
	switch {
	case strings.HasSuffix(file, ".xz"):
		xr, err := xz.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		r = xr
	case strings.HasSuffix(file, ".zst"):
		zr, err := zstd.NewReader(f, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(uint64(maxModule)))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		defer zr.Close()
		r = zr
	}
	b, err := io.ReadAll(io.LimitReader(r, maxModule+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if int64(len(b)) > maxModule {
		return nil, fmt.Errorf("%s: larger than %d MiB as a module", file, maxModule>>20)
	}
	return b, nil
}

// openModule is a module's ELF file, decompressed when it is compressed.
func openModule(file string) (*elf.File, error) {
	b, err := readModule(file)
	if err != nil {
		return nil, err
	}
	return elf.NewFile(bytes.NewReader(b))
}

// ModuleIndex maps canonical names to module files of one kernel.
type ModuleIndex struct {
	Dir string
	// Cache, when set, keeps compressed modules decompressed (Spec.ModuleCache).
	Cache   string
	path    map[string]string
	builtin map[string]bool
}

// read is the module at rel, decompressed: from the cache when it holds
// it, else decompressed (and kept in the cache, written whole or not at
// all).
func (idx *ModuleIndex) read(rel string) ([]byte, error) {
	src := filepath.Join(idx.Dir, rel)
	if idx.Cache == "" || plainPath(rel) == rel {
		return readModule(src)
	}
	kept := filepath.Join(idx.Cache, plainPath(rel))
	if fi, err := os.Lstat(kept); err == nil && fi.Mode().IsRegular() && fi.Size() <= maxModule {
		return os.ReadFile(kept)
	}
	b, err := readModule(src)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(kept), 0o755); err == nil {
		if tmp, err := os.CreateTemp(filepath.Dir(kept), ".module-*"); err == nil {
			_, werr := tmp.Write(b)
			if cerr := tmp.Close(); werr == nil && cerr == nil {
				os.Rename(tmp.Name(), kept)
			}
			os.Remove(tmp.Name())
		}
	}
	return b, nil
}

// IndexModules walks a lib/modules/VERSION folder. Downloaded kernel
// packages carry no modules.dep, so dependencies are read from each module's
// own .modinfo section when needed.
func IndexModules(dir string) (*ModuleIndex, error) {
	idx := &ModuleIndex{Dir: dir, path: map[string]string{}, builtin: map[string]bool{}}
	// Built into the kernel image: nothing to load (arm64 builds virtio in).
	if b, err := os.ReadFile(filepath.Join(dir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			idx.builtin[ModuleName(l)] = true
		}
	}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		// Regular files only: a link among a root tree's modules could
		// name a file outside the tree.
		if d.Type().IsRegular() && isModule(p) {
			rel, _ := filepath.Rel(dir, p)
			idx.path[ModuleName(p)] = rel
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("archive: index modules: %w", err)
	}
	if len(idx.path) == 0 {
		if m, _ := filepath.Glob(filepath.Join(dir, "kernel", "*", "*", "*.ko.*")); len(m) > 0 {
			return nil, fmt.Errorf("archive: the modules under %s are compressed as %s; nbh reads plain, .xz and .zst modules", dir, filepath.Ext(m[0]))
		}
		return nil, fmt.Errorf("archive: no .ko modules under %s", dir)
	}
	return idx, nil
}

// Has reports whether the kernel has the module, as a file or built in.
func (idx *ModuleIndex) Has(name string) bool {
	n := ModuleName(name)
	_, ok := idx.path[n]
	return ok || idx.builtin[n]
}

// Arch is the Debian architecture the modules are built for, from one
// module's ELF header ("" when unknown).
func (idx *ModuleIndex) Arch() string {
	for _, rel := range idx.path {
		f, err := openModule(filepath.Join(idx.Dir, rel))
		if err != nil {
			return ""
		}
		return map[elf.Machine]string{elf.EM_X86_64: "amd64", elf.EM_AARCH64: "arm64", elf.EM_RISCV: "riscv64"}[f.Machine]
	}
	return ""
}

// Depends reads the depends= field of a module's .modinfo.
func Depends(file string) ([]string, error) {
	data, err := readModule(file)
	if err != nil {
		return nil, fmt.Errorf("archive: %w", err)
	}
	return depends(file, data)
}

// depends reads the depends= field of the .modinfo of a module's data.
func depends(file string, data []byte) ([]string, error) {
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("archive: %s: %w", file, err)
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("archive: %s has no .modinfo", file)
	}
	info, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("archive: %s: %w", file, err)
	}
	var deps []string
	for _, kv := range bytes.Split(info, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok && len(v) > 0 {
			for _, d := range strings.Split(string(v), ",") {
				deps = append(deps, ModuleName(d))
			}
		}
	}
	return deps, nil
}

// Closure returns the wanted modules (leaving out those built into the kernel) and everything they depend on, in an
// order that loads every dependency before its users; wanted order is kept
// where dependencies allow.
func (idx *ModuleIndex) Closure(wanted []string) ([]Module, error) {
	var out []Module
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name, from string) error
	visit = func(name, from string) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("archive: module dependency cycle at %s", name)
		case 2:
			return nil
		}
		if idx.builtin[name] {
			state[name] = 2
			return nil
		}
		rel, ok := idx.path[name]
		if !ok {
			if from != "" {
				return fmt.Errorf("archive: module %s (needed by %s) not found in %s", name, from, idx.Dir)
			}
			return fmt.Errorf("archive: module %s not found in %s", name, idx.Dir)
		}
		state[name] = 1
		data, err := idx.read(rel)
		if err != nil {
			return fmt.Errorf("archive: %w", err)
		}
		deps, err := depends(rel, data)
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := visit(d, name); err != nil {
				return err
			}
		}
		state[name] = 2
		out = append(out, Module{Name: name, Path: rel, Depends: deps})
		return nil
	}
	for _, w := range wanted {
		if err := visit(ModuleName(w), ""); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// AddModules copies modules into the archive under lib/modules/VERSION
// (plain: a compressed one decompressed, named .ko) and writes the load
// list the init follows to list.
func (b *Builder) AddModules(idx *ModuleIndex, version string, mods []Module, list string) error {
	var names strings.Builder
	for _, m := range mods {
		dst := filepath.ToSlash(filepath.Join("lib/modules", version, plainPath(m.Path)))
		src := filepath.Join(idx.Dir, m.Path)
		if plainPath(m.Path) == m.Path {
			if err := b.Copy(dst, src); err != nil {
				return err
			}
		} else {
			data, err := idx.read(m.Path)
			if err != nil {
				return fmt.Errorf("archive: %w", err)
			}
			if err := b.file(dst, data, 0o644, src); err != nil {
				return err
			}
		}
		names.WriteString("/" + dst + "\n")
	}
	b.Kernel = version
	return b.File(list, []byte(names.String()), 0o644)
}
