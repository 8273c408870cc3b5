package images

import (
	"context"
	"embed"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// The resolved packages every machine and CI shard boots, committed in the
// repository (images/pins-ARCH.json) and compiled into nbh: the same bytes
// everywhere, and a CI cache can key on these files. `nbh images --update`
// resolves them again from the package archive and rewrites them.
//
//go:embed pins-*.json
var pinFiles embed.FS

// PinSet is one architecture's pins.
type PinSet struct {
	Arch string `json:"arch"`
	// Kernel is the versioned kernel package linux-image-ARCH depended on
	// when the pins were made.
	Kernel   string         `json:"kernel"`
	Packages map[string]Pin `json:"packages"`
}

// Pin is one package at one version, with the .deb's checksum from the
// archive's index.
type Pin struct {
	Version string `json:"version"`
	SHA256  string `json:"sha256"`
	Size    int64  `json:"size"`
}

// PinsFile is the name of arch's pins file in this folder.
func PinsFile(arch string) string { return "pins-" + arch + ".json" }

// Pinned returns the pins compiled into nbh for arch.
func Pinned(arch string) (PinSet, error) {
	b, err := pinFiles.ReadFile(PinsFile(arch))
	if err != nil {
		return PinSet{}, fmt.Errorf("images: no pins for architecture %q (%s)", arch, strings.Join(Arches(), ", "))
	}
	return parsePins(PinsFile(arch), b)
}

// parsePins reads a pins file's contents; name says which file.
func parsePins(name string, b []byte) (PinSet, error) {
	var s PinSet
	if err := json.Unmarshal(b, &s); err != nil {
		return PinSet{}, fmt.Errorf("images: %s: %w", name, err)
	}
	if s.Arch == "" || len(s.Packages) == 0 {
		return PinSet{}, fmt.Errorf("images: %s: no architecture or no packages", name)
	}
	return s, nil
}

// List is "name version" per package, sorted.
func (s PinSet) List() []string {
	var out []string
	for n, p := range s.Packages {
		out = append(out, n+" "+p.Version)
	}
	sort.Strings(out)
	return out
}

// pins is the cache's pin set for arch: PinsOverride when set, else the
// compiled-in pins.
func (c *Cache) pins(arch string) (PinSet, error) {
	if s, ok := c.PinsOverride[arch]; ok {
		return s, nil
	}
	return Pinned(arch)
}

// PinSet is the pin set the cache fetches for arch: PinsOverride's, else
// the compiled-in one.
func (c *Cache) PinSet(arch string) (PinSet, error) { return c.pins(arch) }

// ReadPins reads a pins file (WritePins's format), as a repro bundle
// carries one.
func ReadPins(path string) (PinSet, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return PinSet{}, fmt.Errorf("images: %w", err)
	}
	return parsePins(path, b)
}

// Pins lists the pinned packages of arch as "name version" lines.
func (c *Cache) Pins(arch string) []string {
	s, err := c.pins(arch)
	if err != nil {
		return nil
	}
	return s.List()
}

// Resolve asks the package archive (through fresh private lists) for the
// current version of every package guests of arch boot: what `nbh images
// --update` writes.
func (c *Cache) Resolve(ctx context.Context, arch string) (PinSet, error) {
	files, ok := archFiles[arch]
	if !ok {
		return PinSet{}, fmt.Errorf("images: unknown architecture %q (%s)", arch, strings.Join(Arches(), ", "))
	}
	unlock, err := c.lock()
	if err != nil {
		return PinSet{}, err
	}
	defer unlock()
	if err := c.update(ctx, home(arch), true); err != nil {
		return PinSet{}, err
	}
	s := PinSet{Arch: arch, Packages: map[string]Pin{}}
	if s.Kernel, err = c.kernelDependency(ctx, arch); err != nil {
		return PinSet{}, err
	}
	if s.Packages[s.Kernel], err = c.resolve(ctx, home(arch), s.Kernel); err != nil {
		return PinSet{}, err
	}
	updated := map[string]bool{archSuite[arch]: true}
	for _, f := range files {
		if _, done := s.Packages[f.key()]; done {
			continue
		}
		src := home(arch)
		if f.Suite != "" {
			src.suite = f.Suite
		}
		if !updated[src.suite] {
			if err := c.update(ctx, src, true); err != nil {
				return PinSet{}, err
			}
			updated[src.suite] = true
		}
		if s.Packages[f.key()], err = c.resolve(ctx, src, f.Package); err != nil {
			return PinSet{}, err
		}
	}
	return s, nil
}

// WritePins writes s as arch's pins file into dir (the module's images/
// folder).
func WritePins(dir string, s PinSet) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(dir, PinsFile(s.Arch))
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("images: %w", err)
	}
	return nil
}

// SourceDir is the images/ folder of the nbh source tree this process runs
// in, or "" outside one.
func SourceDir() string {
	if root := moduleRoot(); root != "" {
		return filepath.Join(root, "images")
	}
	return ""
}
