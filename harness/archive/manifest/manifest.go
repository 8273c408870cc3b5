// Package manifest is a boot archive's list of its own files, and the
// freshness check that compares it with a root file system. It needs only the
// standard library: the reference init runs the same check in the guest that
// the boot server runs on the host.
package manifest

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"sort"
	"strings"

	"nbh.dev/nbh/internal/fsutil"
)

// Path is where the manifest lives inside an archive.
const Path = "etc/nbh/manifest.json"

// Manifest describes an archive.
type Manifest struct {
	// Kernel is the kernel version (uname -r) the archive's modules belong to.
	Kernel string `json:"kernel,omitempty"`
	// Compression is how the archive is compressed (gzip or zstd).
	Compression string  `json:"compression,omitempty"`
	Files       []Entry `json:"files"`
}

// Entry is one regular file of an archive.
type Entry struct {
	Path   string `json:"path"` // absolute path inside the archive
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
	// Source is "root:/PATH" for a copy of the root file system's /PATH
	// (RootPath returns PATH); empty for the files the builder was given
	// from the host (their host path would make the archive differ from
	// one cache folder to the next).
	Source string `json:"source,omitempty"`
	// Editable files are configuration an administrator changes on the
	// root; a copy in the archive goes stale when they do.
	Editable bool `json:"editable,omitempty"`
	// Secret files (keys) are never printed; their hash is kept so a
	// changed key still shows as drift.
	Secret bool `json:"secret,omitempty"`
}

// RootPrefix marks a Source on the root file system.
const RootPrefix = "root:"

// RootPath is the root file system path an entry is a copy of, or "".
func (e Entry) RootPath() string {
	p, ok := strings.CutPrefix(e.Source, RootPrefix)
	if !ok {
		return ""
	}
	return p
}

// Tracked lists the entries copied from the root file system.
func (m Manifest) Tracked() []Entry {
	var out []Entry
	for _, e := range m.Files {
		if e.RootPath() != "" {
			out = append(out, e)
		}
	}
	return out
}

// Lookup returns the entry for an archive path.
func (m Manifest) Lookup(p string) (Entry, bool) {
	p = "/" + strings.TrimPrefix(path.Clean("/"+p), "/")
	for _, e := range m.Files {
		if e.Path == p {
			return e, true
		}
	}
	return Entry{}, false
}

// Parse reads a manifest.
func Parse(b []byte) (Manifest, error) {
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return Manifest{}, fmt.Errorf("manifest: %w", err)
	}
	return m, nil
}

// Marshal writes a manifest, entries sorted by path.
func (m Manifest) Marshal() []byte {
	m.Files = append([]Entry(nil), m.Files...) // sort a copy, not the caller's
	sort.Slice(m.Files, func(i, j int) bool { return m.Files[i].Path < m.Files[j].Path })
	b, _ := json.MarshalIndent(m, "", " ")
	return append(b, '\n')
}

// Drift is a tracked file whose copy in the archive no longer matches the
// root file system.
type Drift struct {
	Path    string // in the archive
	Root    string // on the root file system
	Archive string // SHA-256 of the archive's copy
	Now     string // SHA-256 on the root now; "" when the file is gone; "size N" when its size differs (not read)
	Secret  bool
}

func (d Drift) String() string {
	now := d.Now
	switch {
	case now == "":
		now = "missing"
	case !strings.HasPrefix(now, "size "):
		now = Short(now)
	}
	return fmt.Sprintf("%s archive=%s root=%s", d.Root, Short(d.Archive), now)
}

// Short abbreviates a hash for reports (secrets are hashed, never shown, so
// a short hash is as much as any report says of them).
func Short(h string) string {
	if len(h) > 12 {
		return h[:12]
	}
	return h
}

// Check compares every tracked entry with root, a root file system (the
// guest's mounted root, or the export folder on the boot server), and lists
// the drifted files in manifest order. It reads only the tracked paths;
// given an os.Root's FS, a symlink on the root cannot lead it outside.
func Check(m Manifest, root fs.FS) ([]Drift, error) {
	var drift []Drift
	for _, e := range m.Tracked() {
		p := strings.TrimPrefix(path.Clean("/"+e.RootPath()), "/")
		now, err := hashIfSize(root, p, e.Size)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("manifest: %s: %w", e.RootPath(), err)
		}
		if now != e.SHA256 {
			drift = append(drift, Drift{Path: e.Path, Root: e.RootPath(), Archive: e.SHA256, Now: now, Secret: e.Secret})
		}
	}
	return drift, nil
}

// hashIfSize is the hex SHA-256 of a file in fsys of size bytes, or "size
// N" for a file of another size, which is not read: a root's file can be
// made huge (and sparse) in one write, and a check must not read it all.
func hashIfSize(fsys fs.FS, p string, size int64) (string, error) {
	f, err := fsys.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", err
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("not a regular file (%s)", fi.Mode().Type())
	}
	if fi.Size() != size {
		return fmt.Sprintf("size %d", fi.Size()), nil
	}
	return fsutil.SHA256(io.LimitReader(f, size))
}

// Hash is the hex SHA-256 of a file in fsys.
func Hash(fsys fs.FS, p string) (string, error) {
	f, err := fsys.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	return fsutil.SHA256(f)
}

// HashFile is the hex SHA-256 of a host file.
func HashFile(p string) (string, error) { return fsutil.SHA256File(p) }
