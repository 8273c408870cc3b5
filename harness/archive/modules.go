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
	"syscall"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	"nbh.dev/nbh/internal/fsutil"
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
	return readModuleFrom(file, f)
}

// readModuleFrom reads a module from f (named file), decompressing an .xz or
// .zst one, up to maxModule bytes.
func readModuleFrom(file string, f io.Reader) ([]byte, error) {
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

// ModuleIndex maps canonical names to module files of one kernel.
type ModuleIndex struct {
	Dir string
	// Cache, when set, says the modules are a trusted kernel's (a pinned
	// Debian package, Spec.ModuleCache): compressed ones are read, and
	// kept here decompressed. Without it only plain modules are read: a
	// root of the user's (or a guest's writable copy of it) is no place
	// to decompress from (an xz header may ask for gigabytes).
	Cache   string
	path    map[string]string
	builtin map[string]bool
	data    map[string][]byte // each module as first read: what Closure read, AddModules copies
}

// read is the module at rel, plain, read once: through an os.Root of the
// modules folder (a link swapped in between reads cannot lead out of it),
// a compressed one decompressed (or from the cache).
func (idx *ModuleIndex) read(rel string) ([]byte, error) {
	if b, ok := idx.data[rel]; ok {
		return b, nil
	}
	compressed := plainPath(rel) != rel
	if compressed && idx.Cache == "" {
		return nil, fmt.Errorf("%s: a compressed module; nbh decompresses only the modules of its pinned Debian kernels, so give your root's modules plain (.ko)", filepath.Join(idx.Dir, rel))
	}
	var kept string
	if compressed {
		kept = filepath.Join(idx.Cache, plainPath(rel))
		if b, err := readPlain(kept); err == nil {
			idx.data[rel] = b
			return b, nil
		}
	}
	root, err := os.OpenRoot(idx.Dir)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	f, err := root.Open(rel)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file", filepath.Join(idx.Dir, rel))
	}
	b, err := readModuleFrom(filepath.Join(idx.Dir, rel), f)
	if err != nil {
		return nil, err
	}
	if compressed {
		// Kept for the next build; a failure to keep it costs time only.
		if os.MkdirAll(filepath.Dir(kept), 0o755) == nil {
			fsutil.WriteAtomic(kept, b)
		}
	}
	idx.data[rel] = b
	return b, nil
}

// readPlain reads a kept decompressed module, refusing a link, a file past
// the bound and anything that is not an ELF module (a broken entry is
// decompressed again).
func readPlain(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() || fi.Size() > maxModule {
		return nil, fmt.Errorf("%s: not a kept module", path)
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, err
	}
	e, err := elf.NewFile(bytes.NewReader(b))
	if err != nil || e.Section(".modinfo") == nil {
		return nil, fmt.Errorf("%s: not a module", path)
	}
	return b, nil
}

// IndexModules walks a lib/modules/VERSION folder. Downloaded kernel
// packages carry no modules.dep, so dependencies are read from each module's
// own .modinfo section when needed.
func IndexModules(dir string) (*ModuleIndex, error) {
	idx := &ModuleIndex{Dir: dir, path: map[string]string{}, builtin: map[string]bool{}, data: map[string][]byte{}}
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
		b, err := idx.read(rel)
		if err != nil {
			return ""
		}
		f, err := elf.NewFile(bytes.NewReader(b))
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
		data, err := idx.read(m.Path)
		if err != nil {
			return fmt.Errorf("archive: %w", err)
		}
		if err := b.file(dst, data, 0o644, filepath.Join(idx.Dir, m.Path)); err != nil {
			return err
		}
		names.WriteString("/" + dst + "\n")
	}
	b.Kernel = version
	return b.File(list, []byte(names.String()), 0o644)
}
