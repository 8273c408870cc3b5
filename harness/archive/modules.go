package archive

import (
	"bytes"
	"debug/elf"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// ModuleList is where the init finds the modules to load at start, in order;
// lists for later needs (ModuleList + ".nfs") sit beside it.
const ModuleList = "etc/nbh/modules"

// Module is one kernel module file.
type Module struct {
	Name    string   // canonical name (underscores)
	Path    string   // relative to the modules folder, e.g. kernel/net/core/failover.ko
	Depends []string // canonical names
}

// ModuleName canonicalises a module name: the kernel treats - and _ alike.
func ModuleName(s string) string {
	s = strings.TrimSuffix(filepath.Base(s), ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

// ModuleIndex maps canonical names to module files of one kernel.
type ModuleIndex struct {
	Dir     string
	path    map[string]string
	builtin map[string]bool
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
		if d.Type().IsRegular() && strings.HasSuffix(p, ".ko") {
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
			return nil, fmt.Errorf("archive: the modules under %s are compressed (%s); nbh reads only plain .ko modules", dir, filepath.Ext(m[0]))
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
		f, err := elf.Open(filepath.Join(idx.Dir, rel))
		if err != nil {
			return ""
		}
		defer f.Close()
		return map[elf.Machine]string{elf.EM_X86_64: "amd64", elf.EM_AARCH64: "arm64", elf.EM_RISCV: "riscv64"}[f.Machine]
	}
	return ""
}

// Depends reads the depends= field of a module's .modinfo.
func Depends(file string) ([]string, error) {
	f, err := elf.Open(file)
	if err != nil {
		return nil, fmt.Errorf("archive: %s: %w", file, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("archive: %s has no .modinfo", file)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("archive: %s: %w", file, err)
	}
	var deps []string
	for _, kv := range bytes.Split(data, []byte{0}) {
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
		deps, err := Depends(filepath.Join(idx.Dir, rel))
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

// AddModules copies modules into the archive under lib/modules/VERSION and
// writes the load list the init follows to list.
func (b *Builder) AddModules(idx *ModuleIndex, version string, mods []Module, list string) error {
	var names strings.Builder
	for _, m := range mods {
		dst := filepath.ToSlash(filepath.Join("lib/modules", version, m.Path))
		if err := b.Copy(dst, filepath.Join(idx.Dir, m.Path)); err != nil {
			return err
		}
		names.WriteString("/" + dst + "\n")
	}
	b.Kernel = version
	return b.File(list, []byte(names.String()), 0o644)
}
