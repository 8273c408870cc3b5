package images

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"gotest.tools/v3/assert"
)

// fakeEntry makes a cache that pins pkg and holds its unpacked folder.
func fakeEntry(t *testing.T, stamp string) (*Cache, string) {
	c := &Cache{Dir: t.TempDir(), Log: os.Stderr}
	pins := map[string]pin{"busybox-static": {Version: "1:1.0-1", SHA256: "abc123", Size: 10}}
	b, _ := json.Marshal(pins)
	assert.NilError(t, os.WriteFile(filepath.Join(c.Dir, "lock-amd64.json"), b, 0o644))
	dir := c.pkgDir("busybox-static", "1:1.0-1", "amd64")
	assert.NilError(t, os.MkdirAll(filepath.Join(dir, "bin"), 0o755))
	assert.NilError(t, os.WriteFile(filepath.Join(dir, "bin/busybox"), []byte("bb"), 0o755))
	if stamp != "" {
		assert.NilError(t, os.WriteFile(filepath.Join(dir, ".complete"), []byte(stamp+"\n"), 0o644))
	}
	return c, dir
}

// A complete entry is used without apt: with no apt-get on PATH at all.
func TestCompleteEntryIsOffline(t *testing.T) {
	c, dir := fakeEntry(t, "abc123")
	t.Setenv("PATH", t.TempDir())
	p, err := c.Path(context.Background(), "amd64", Busybox)
	assert.NilError(t, err)
	assert.Equal(t, p, filepath.Join(dir, "bin/busybox"))
}

// A partial entry (no stamp) or a stamp of another .deb is fetched again.
func TestPartialOrCorruptEntryIsFetchedAgain(t *testing.T) {
	for _, stamp := range []string{"", "deadbeef"} {
		c, _ := fakeEntry(t, stamp)
		t.Setenv("PATH", t.TempDir())
		_, err := c.Path(context.Background(), "amd64", Busybox)
		assert.Assert(t, errors.Is(err, ErrMissingTool), "stamp %q: want a fetch attempt, got %v", stamp, err)
	}
}

func TestUnknownArch(t *testing.T) {
	err := FetchAll(context.Background(), &Cache{Dir: t.TempDir()}, "riscv64")
	assert.ErrorContains(t, err, "unknown architecture")
}
