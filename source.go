// Package nbh holds the part of nbh's own source that nbh needs at run time:
// the reference init's, which the lab cross-compiles for each guest
// architecture with the Go on PATH (fixtures.BuildInit). Carrying it inside
// the binary, instead of finding the source tree, is what lets nbh run as a
// dependency of another module, built with -trimpath, or as a binary copied
// far from any checkout: building needs only Go and the init's modules
// (those nbh itself is built from, so usually already in the module cache).
package nbh

import "embed"

// InitSource is the init's main package (and the hostile guest's of nbh's
// own tests, fixtures/attacker) and the nbh packages they import, with the
// module's go.mod and go.sum, laid out as in the module.
//
//go:embed go.mod go.sum fixtures/init/*.go fixtures/attacker/*.go harness/archive/manifest/*.go internal/fsutil/*.go
var InitSource embed.FS
