package images

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// errOutside marks a path inside a package that leads out of it.
var errOutside = errors.New("leads outside the package")

// resolveIn returns the real path of rel inside the unpacked package at root,
// following symbolic links the way the installed package would see them: an
// absolute target starts again at the package's root (Debian's ipxe ships
// usr/lib/ipxe/ipxe.efi -> /boot/ipxe.efi, and /boot/ipxe.efi is in the
// package), a relative one from the link's folder. A link whose target
// climbs above the package's root is an error: the host's own files (which
// may be another version of the same package, or none) are never used.
func resolveIn(root, rel string) (string, error) {
	const maxLinks = 40 // as the kernel's ELOOP limit
	todo := splitPath(rel)
	var done []string // resolved components below root, none a link
	links := 0
	for len(todo) > 0 {
		c := todo[0]
		todo = todo[1:]
		switch c {
		case ".":
			continue
		case "..":
			if len(done) == 0 {
				return "", fmt.Errorf("%s: %w", rel, errOutside)
			}
			done = done[:len(done)-1]
			continue
		}
		here := filepath.Join(append([]string{root}, append(done, c)...)...)
		fi, err := os.Lstat(here)
		if err != nil {
			return "", fmt.Errorf("%s: %w", rel, err)
		}
		if fi.Mode()&os.ModeSymlink == 0 {
			done = append(done, c)
			continue
		}
		if links++; links > maxLinks {
			return "", fmt.Errorf("%s: too many symbolic links", rel)
		}
		target, err := os.Readlink(here)
		if err != nil {
			return "", fmt.Errorf("%s: %w", rel, err)
		}
		if filepath.IsAbs(target) {
			done = nil
		}
		todo = append(splitPath(target), todo...)
	}
	return filepath.Join(append([]string{root}, done...)...), nil
}

func splitPath(p string) []string {
	var out []string
	for _, c := range strings.Split(p, "/") {
		if c != "" {
			out = append(out, c)
		}
	}
	return out
}
