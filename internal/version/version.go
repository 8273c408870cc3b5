// Package version says which nbh this is, for reports and bundles.
package version

import "runtime/debug"

// Version is set at build time (make build: -ldflags -X, from git describe);
// otherwise it comes from the build's VCS stamp, else "devel".
var Version string

// String is the nbh version.
func String() string {
	if Version != "" {
		return Version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		rev, dirty := "", false
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
		if rev != "" {
			if len(rev) > 12 {
				rev = rev[:12]
			}
			if dirty {
				rev += "-dirty"
			}
			return rev
		}
	}
	return "devel"
}
