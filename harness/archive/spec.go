package archive

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"nbh.dev/nbh/harness/archive/manifest"
	"nbh.dev/nbh/internal/fsutil"
)

// Spec declares an archive: what goes in, from where. The same Spec with the
// same input contents always gives the same archive, byte for byte.
type Spec struct {
	// Kernel is the kernel version recorded in the manifest; modules go
	// under lib/modules/Kernel. Naming another version than the modules
	// really are is how a module-skewed archive is made.
	Kernel string
	// Modules is the host folder lib/modules/VERSION modules come from.
	Modules string
	// ModuleSets are module lists, each written (in load order) to its List
	// path with its dependency closure; a set leaves out what an earlier
	// set already carries.
	ModuleSets []ModuleSet

	Init    string            // host path of /init
	Files   map[string]string // archive path -> host path
	Dirs    []string
	Devices []Device
	Links   map[string]string // archive path -> symlink target

	// Root is the host folder of the root file system that Tracked files
	// are copied from; each keeps its root path in the archive.
	Root    string
	Tracked []Tracked
	// Secrets are files whose contents are never shown (keys).
	Secrets map[string][]byte

	// OmitModules leaves these modules' files out while the lists still
	// name them: an archive missing a module, for fault injection.
	OmitModules []string

	Compression string // Gzip (default) or Zstd
}

// MaxTrackedBytes bounds the root files an archive copies (they are held
// in memory while it is built).
const MaxTrackedBytes = 1 << 30

// ModuleSet is one module list of an archive.
type ModuleSet struct {
	List  string   // archive path of the list
	Names []string // modules wanted; their dependencies are added
}

// Tracked is a root file system file the archive carries a copy of.
type Tracked struct {
	Path     string // on the root, e.g. /etc/nbh/boot.conf
	Editable bool
}

// Device is a character device node.
type Device struct {
	Path         string
	Perm         os.FileMode
	Major, Minor uint32
}

// Result is a built archive.
type Result struct {
	Path     string // the archive in the cache; never modify it
	Manifest Manifest
	Key      string // the content address
	Cached   bool   // true when an earlier build was reused
}

// buildVersion changes when the builder's output for the same inputs does.
const buildVersion = "nbh-archive-2"

// Build makes the archive spec declares in cacheDir, named by a hash of the
// spec and of every input's contents, or reuses the one already there.
func Build(spec Spec, cacheDir string) (*Result, error) {
	key, err := spec.key()
	if err != nil {
		return nil, err
	}
	ext := map[string]string{"": ".gz", Gzip: ".gz", Zstd: ".zst"}[spec.Compression]
	if ext == "" {
		return nil, fmt.Errorf("archive: compression %q: want %s or %s", spec.Compression, Gzip, Zstd)
	}
	r := &Result{Path: filepath.Join(cacheDir, key+".cpio"+ext), Key: key}
	mpath := filepath.Join(cacheDir, key+".manifest.json")
	if _, err := os.Stat(r.Path); err == nil {
		if b, err := os.ReadFile(mpath); err == nil {
			if m, err := manifest.Parse(b); err == nil {
				r.Manifest, r.Cached = m, true
				now := time.Now()
				os.Chtimes(r.Path, now, now) // recently used: pruned last
				return r, nil
			}
		}
	}
	b, err := spec.builder()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("archive: %w", err)
	}
	if err := b.WriteFile(r.Path); err != nil {
		return nil, err
	}
	r.Manifest = b.Manifest()
	if err := fsutil.WriteAtomic(mpath, r.Manifest.Marshal()); err != nil {
		return nil, fmt.Errorf("archive: %w", err)
	}
	prune(cacheDir, keepArchives, r.Path)
	return r, nil
}

// keepArchives is how many archives a build cache keeps: the least
// recently used beyond it are removed after each new build.
var keepArchives = 48 // a variable for the test of pruning

// prune removes the least recently used archives (and their manifests)
// beyond keep, never keep's own newest one. An archive a guest is still
// being served survives: the lab serves a link or a copy of it.
func prune(dir string, keep int, newest string) {
	paths, _ := filepath.Glob(filepath.Join(dir, "*.cpio.*"))
	if len(paths) <= keep {
		return
	}
	type aged struct {
		path string
		t    time.Time
	}
	var all []aged
	for _, p := range paths {
		if fi, err := os.Stat(p); err == nil && p != newest {
			all = append(all, aged{p, fi.ModTime()})
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i].t.After(all[j].t) })
	for _, a := range all[min(len(all), keep-1):] {
		os.Remove(a.path)
		key := strings.TrimSuffix(filepath.Base(a.path), filepath.Ext(a.path))
		os.Remove(filepath.Join(dir, strings.TrimSuffix(key, ".cpio")+".manifest.json"))
	}
}

// builder adds everything spec declares.
func (spec Spec) builder() (*Builder, error) {
	b := New()
	b.Compression = spec.Compression
	b.Kernel = spec.Kernel
	for _, d := range spec.Dirs {
		if err := b.Dir(d, 0o755); err != nil {
			return nil, err
		}
	}
	for _, d := range spec.Devices {
		if err := b.CharDev(d.Path, d.Perm, d.Major, d.Minor); err != nil {
			return nil, err
		}
	}
	for _, p := range sortedKeys(spec.Links) {
		if err := b.Symlink(p, spec.Links[p]); err != nil {
			return nil, err
		}
	}
	if spec.Init != "" {
		if err := b.Copy("init", spec.Init); err != nil {
			return nil, err
		}
	}
	for _, p := range sortedKeys(spec.Files) {
		if err := b.Copy(p, spec.Files[p]); err != nil {
			return nil, err
		}
	}
	if len(spec.ModuleSets) > 0 {
		idx, err := IndexModules(spec.Modules)
		if err != nil {
			return nil, err
		}
		var names []string
		var mods []Module
		have := 0
		for _, set := range spec.ModuleSets {
			names = append(names, set.Names...)
			mods, err = idx.Closure(names)
			if err != nil {
				return nil, err
			}
			// The closure keeps earlier sets' modules first.
			if err := b.AddModules(idx, spec.Kernel, mods[have:], set.List); err != nil {
				return nil, err
			}
			have = len(mods)
		}
		for _, name := range spec.OmitModules {
			found := false
			for _, m := range mods {
				if m.Name == ModuleName(name) {
					b.Remove(path.Join("lib/modules", spec.Kernel, m.Path))
					found = true
				}
			}
			if !found {
				return nil, fmt.Errorf("archive: omit module %s: not in the archive", name)
			}
		}
	}
	if len(spec.Tracked) > 0 {
		root, err := os.OpenRoot(spec.Root)
		if err != nil {
			return nil, fmt.Errorf("archive: root tree: %w", err)
		}
		defer root.Close()
		var total int64
		for _, t := range spec.Tracked {
			rel := strings.TrimPrefix(path.Clean("/"+t.Path), "/")
			if _, taken := b.entries[rel]; taken {
				return nil, fmt.Errorf("archive: the root's %s would replace the archive's own", t.Path)
			}
			if fi, err := root.Stat(rel); err == nil {
				if total += fi.Size(); total > MaxTrackedBytes {
					return nil, fmt.Errorf("archive: the root's files add up to more than %d MiB (at %s): name fewer", MaxTrackedBytes>>20, t.Path)
				}
			}
			if err := b.FromRoot(root, t.Path, t.Editable); err != nil {
				return nil, err
			}
		}
	}
	for _, p := range sortedKeys(spec.Secrets) {
		if err := b.Secret(p, spec.Secrets[p]); err != nil {
			return nil, err
		}
	}
	return b, nil
}

// key hashes the spec and the contents of every input it names.
func (spec Spec) key() (string, error) {
	type input struct {
		Name, Hash string
	}
	var inputs []input
	hashFile := func(name, p string) error {
		h, err := manifest.HashFile(p)
		if err != nil {
			return fmt.Errorf("archive: %w", err)
		}
		inputs = append(inputs, input{name, h})
		return nil
	}
	if spec.Init != "" {
		if err := hashFile("init", spec.Init); err != nil {
			return "", err
		}
	}
	for _, p := range sortedKeys(spec.Files) {
		if err := hashFile(p, spec.Files[p]); err != nil {
			return "", err
		}
	}
	if len(spec.Tracked) > 0 {
		root, err := os.OpenRoot(spec.Root)
		if err != nil {
			return "", fmt.Errorf("archive: root tree: %w", err)
		}
		defer root.Close()
		for _, t := range spec.Tracked {
			h, err := manifest.Hash(root.FS(), trimSlash(t.Path))
			if err != nil {
				return "", fmt.Errorf("archive: root file %s: %w", t.Path, err)
			}
			inputs = append(inputs, input{"root:" + t.Path, h})
		}
	}
	for _, p := range sortedKeys(spec.Secrets) {
		sum := sha256.Sum256(spec.Secrets[p])
		inputs = append(inputs, input{"secret:" + p, hex.EncodeToString(sum[:])})
	}
	// Modules come from a versioned package folder that never changes
	// once unpacked: its path stands for its contents.
	shape := spec
	shape.Root, shape.Files, shape.Secrets, shape.Init = "", nil, nil, ""
	b, err := json.Marshal(struct {
		Version string
		Spec    Spec
		Inputs  []input
	}{buildVersion, shape, inputs})
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:16]), nil
}

func trimSlash(p string) string {
	for len(p) > 0 && p[0] == '/' {
		p = p[1:]
	}
	return p
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
