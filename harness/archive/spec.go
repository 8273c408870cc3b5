package archive

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"nbh.dev/nbh/harness/archive/manifest"
	"nbh.dev/nbh/internal/fsutil"
	"nbh.dev/nbh/internal/rules"
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
	// ModuleCache, when set, is a folder that keeps compressed modules
	// decompressed after their first read, by their path under Modules:
	// for modules that never change (a kernel package in the image
	// cache), so a rebuild does not decompress them again. Not part of
	// the archive's key: it changes how, not what.
	ModuleCache string `json:"-"`
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
// in memory while it is built). A file past it is refused by its size,
// unread: a guest can make one on its root huge and sparse in one write.
const MaxTrackedBytes = 1 << 30

// ErrTrackedTooLarge is root files past MaxTrackedBytes.
var ErrTrackedTooLarge = errors.New("the root's files are too large for an archive")

// rootFile is a root file an archive carries, as read once for it.
type rootFile struct {
	path, rel string
	data      []byte
	mode      os.FileMode
	editable  bool
}

// snapshot reads the spec's tracked root files, each once, through an
// os.Root (a symlink on the root cannot lead out of it), refusing what is
// not a regular file and stopping at MaxTrackedBytes in all.
func (spec Spec) snapshot() ([]rootFile, error) {
	if len(spec.Tracked) == 0 {
		return nil, nil
	}
	root, err := os.OpenRoot(spec.Root)
	if err != nil {
		return nil, fmt.Errorf("archive: root tree: %w", err)
	}
	defer root.Close()
	var out []rootFile
	left := int64(MaxTrackedBytes)
	for _, t := range spec.Tracked {
		rel := strings.TrimPrefix(path.Clean("/"+t.Path), "/")
		data, mode, err := readBounded(root, rel, left)
		if errors.Is(err, ErrTrackedTooLarge) {
			return nil, fmt.Errorf("archive: %w: they add up to more than %d MiB (at %s): name fewer, or make them smaller", err, MaxTrackedBytes>>20, t.Path)
		}
		if err != nil {
			return nil, fmt.Errorf("archive: root file %s: %w", t.Path, err)
		}
		left -= int64(len(data))
		out = append(out, rootFile{path: t.Path, rel: rel, data: data, mode: mode, editable: t.Editable})
	}
	return out, nil
}

// readBounded reads the regular file rel of root, refusing it past limit
// bytes: by its size before reading, and again while reading (it may grow).
func readBounded(root *os.Root, rel string, limit int64) ([]byte, os.FileMode, error) {
	// Non-blocking: a FIFO would block the open; its type is refused below.
	f, err := root.OpenFile(rel, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, 0, err
	}
	if !fi.Mode().IsRegular() {
		return nil, 0, fmt.Errorf("not a regular file (%s)", fi.Mode().Type())
	}
	if fi.Size() > limit {
		return nil, 0, fmt.Errorf("%w (%d bytes)", ErrTrackedTooLarge, fi.Size())
	}
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, 0, err
	}
	if int64(len(data)) > limit {
		return nil, 0, fmt.Errorf("%w (it grew while read)", ErrTrackedTooLarge)
	}
	return data, fi.Mode(), nil
}

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
	// The root's files are read once: the key is the hash of the bytes
	// the archive is built from, so no entry is filed under one content
	// while holding another (a guest can change its root's files between
	// two reads).
	snap, err := spec.snapshot()
	if err != nil {
		return nil, err
	}
	key, err := spec.key(snap)
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
	if !rules.On(rules.ArchiveOneRead) {
		if snap, err = spec.snapshot(); err != nil { // read again for the build
			return nil, err
		}
	}
	b, err := spec.builder(snap)
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
func (spec Spec) builder(snap []rootFile) (*Builder, error) {
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
		idx.Cache = spec.ModuleCache
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
					b.Remove(path.Join("lib/modules", spec.Kernel, plainPath(m.Path)))
					found = true
				}
			}
			if !found {
				return nil, fmt.Errorf("archive: omit module %s: not in the archive", name)
			}
		}
	}
	for _, f := range snap {
		if _, taken := b.entries[f.rel]; taken {
			return nil, fmt.Errorf("archive: the root's %s would replace the archive's own", f.path)
		}
		if err := b.file(f.rel, f.data, f.mode, manifest.RootPrefix+"/"+f.rel); err != nil {
			return nil, err
		}
		b.entries[f.rel].editable = f.editable
	}
	for _, p := range sortedKeys(spec.Secrets) {
		if err := b.Secret(p, spec.Secrets[p]); err != nil {
			return nil, err
		}
	}
	return b, nil
}

// key hashes the spec and the contents of every input it names.
func (spec Spec) key(snap []rootFile) (string, error) {
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
	for _, f := range snap {
		sum := sha256.Sum256(f.data)
		inputs = append(inputs, input{"root:" + f.path, fmt.Sprintf("%x %o", sum, f.mode)})
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
