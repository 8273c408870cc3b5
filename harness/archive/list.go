package archive

import (
	"bufio"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"sort"
	"strings"
)

// ReadList reads a file list for an archive made from a root tree: one root
// path a line (absolute, or relative to the root), a glob pattern
// (/etc/modprobe.d/*.conf) or a folder (everything under it); blank lines
// and lines starting with # are skipped. Lines prefixed "config " mark
// editable configuration (the manifest says so).
func ReadList(r io.Reader) ([]Tracked, error) {
	var out []Tracked
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		t := Tracked{Path: line}
		if p, ok := strings.CutPrefix(line, "config "); ok {
			t = Tracked{Path: strings.TrimSpace(p), Editable: true}
		}
		if _, err := path.Match(t.Path, ""); err != nil {
			return nil, fmt.Errorf("file list line %d: %q: %w", n, line, err)
		}
		out = append(out, t)
	}
	return out, sc.Err()
}

// ExpandList resolves a file list (ReadList) against the root tree at dir:
// globs matched and folders walked inside the root (an os.Root: symlinks
// cannot lead out of it), each regular file once, sorted. A line that
// matches nothing is an error naming it.
func ExpandList(dir string, list []Tracked) ([]Tracked, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("archive: root %s: %w", dir, err)
	}
	defer root.Close()
	fsys := root.FS()
	seen := map[string]bool{}
	var out []Tracked
	add := func(p string, editable bool) {
		if !seen[p] {
			seen[p] = true
			out = append(out, Tracked{Path: "/" + p, Editable: editable})
		}
	}
	for _, t := range list {
		pat := strings.TrimPrefix(path.Clean("/"+t.Path), "/")
		if pat == "" {
			pat = "."
		}
		matches, err := fs.Glob(fsys, pat)
		if err != nil {
			return nil, fmt.Errorf("archive: file list %q: %w", t.Path, err)
		}
		found := 0
		for _, m := range matches {
			fi, err := fs.Stat(fsys, m)
			if err != nil {
				continue // a dangling link
			}
			switch {
			case fi.Mode().IsRegular():
				add(m, t.Editable)
				found++
			case fi.IsDir():
				err := fs.WalkDir(fsys, m, func(p string, d fs.DirEntry, err error) error {
					if err != nil {
						return err
					}
					if d.Type().IsRegular() {
						add(p, t.Editable)
						found++
					}
					return nil
				})
				if err != nil {
					return nil, fmt.Errorf("archive: file list %q: %w", t.Path, err)
				}
			}
		}
		if found == 0 {
			return nil, fmt.Errorf("archive: file list %q: no file in %s matches", t.Path, dir)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out, nil
}
