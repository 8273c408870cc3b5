package archive

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/archive/manifest"
)

// rootTree is a small root file system with one editable file, one that is
// not, and a symlink leading out of it.
func rootTree(t *testing.T) string {
	base := t.TempDir()
	root := filepath.Join(base, "root")
	assert.NilError(t, os.MkdirAll(filepath.Join(root, "etc/nbh"), 0o755))
	assert.NilError(t, os.WriteFile(filepath.Join(root, "etc/nbh/boot.conf"), []byte("greeting=hello\n"), 0o644))
	assert.NilError(t, os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("g1\n"), 0o644))
	assert.NilError(t, os.WriteFile(filepath.Join(base, "outside"), []byte("secret\n"), 0o644))
	assert.NilError(t, os.Symlink("../../outside", filepath.Join(root, "etc/escape")))
	return root
}

func testSpec(t *testing.T, root string) Spec {
	initBin := filepath.Join(t.TempDir(), "init")
	assert.NilError(t, os.WriteFile(initBin, []byte("#!/bin/sh\n"), 0o755))
	return Spec{
		Kernel:  "6.1.0-test",
		Init:    initBin,
		Dirs:    []string{"proc", "sys"},
		Devices: []Device{{"dev/console", 0o600, 5, 1}},
		Links:   map[string]string{"bin/sh": "busybox"},
		Root:    root,
		Tracked: []Tracked{{"/etc/nbh/boot.conf", true}, {"/etc/hostname", false}},
		Secrets: map[string][]byte{"etc/nbh/esp.key": []byte("0123456789abcdef")},
	}
}

// TestBuildIsContentAddressed: the same spec and inputs reuse the cached
// archive; a changed input (a tracked file on the root) builds a new one.
func TestBuildIsContentAddressed(t *testing.T) {
	root := rootTree(t)
	cache := t.TempDir()
	spec := testSpec(t, root)
	a, err := Build(spec, cache)
	assert.NilError(t, err)
	assert.Assert(t, !a.Cached)
	b, err := Build(spec, cache)
	assert.NilError(t, err)
	assert.Assert(t, b.Cached)
	assert.Equal(t, a.Path, b.Path)

	assert.NilError(t, os.WriteFile(filepath.Join(root, "etc/nbh/boot.conf"), []byte("greeting=changed\n"), 0o644))
	c, err := Build(spec, cache)
	assert.NilError(t, err)
	assert.Assert(t, !c.Cached)
	assert.Assert(t, c.Path != a.Path)

	spec.Compression = Zstd
	d, err := Build(spec, cache)
	assert.NilError(t, err)
	assert.Assert(t, strings.HasSuffix(d.Path, ".cpio.zst"), d.Path)
	assert.Equal(t, d.Manifest.Compression, Zstd)

	spec.Compression = "lz4"
	_, err = Build(spec, cache)
	assert.ErrorContains(t, err, "compression")
}

// TestManifestRecordsSources: tracked files keep their root path and
// editability; secrets are marked; the manifest inside the archive is the
// one Build returns.
func TestManifestRecordsSources(t *testing.T) {
	root := rootTree(t)
	spec := testSpec(t, root)
	spec.Compression = Zstd
	r, err := Build(spec, t.TempDir())
	assert.NilError(t, err)
	conf, ok := r.Manifest.Lookup("/etc/nbh/boot.conf")
	assert.Assert(t, ok)
	assert.Equal(t, conf.RootPath(), "/etc/nbh/boot.conf")
	assert.Assert(t, conf.Editable)
	host, _ := r.Manifest.Lookup("etc/hostname")
	assert.Assert(t, !host.Editable && host.RootPath() == "/etc/hostname")
	key, _ := r.Manifest.Lookup("/etc/nbh/esp.key")
	assert.Assert(t, key.Secret)
	assert.Equal(t, r.Manifest.Kernel, "6.1.0-test")
	init, _ := r.Manifest.Lookup("/init")
	assert.Equal(t, init.Source, "", "a host path in the manifest")

	// The same files from other host folders make the same bytes.
	otherSpec := testSpec(t, rootTree(t))
	otherSpec.Compression = Zstd
	other, err := Build(otherSpec, t.TempDir())
	assert.NilError(t, err)
	assert.Equal(t, sha(t, r.Path), sha(t, other.Path))

	// Unpack with the system's cpio after zstd: the manifest inside
	// matches, and every file matches its entry.
	f, err := os.Open(r.Path)
	assert.NilError(t, err)
	defer f.Close()
	zr, err := zstd.NewReader(f)
	assert.NilError(t, err)
	raw, err := io.ReadAll(zr)
	assert.NilError(t, err)
	dir := t.TempDir()
	x := exec.Command("cpio", "-id", "--no-absolute-filenames", "--nonmatching", "dev/*")
	x.Dir = dir
	x.Stdin = bytes.NewReader(raw)
	out, err := x.CombinedOutput()
	assert.NilError(t, err, "%s", out)
	mb, err := os.ReadFile(filepath.Join(dir, ManifestPath))
	assert.NilError(t, err)
	inside, err := manifest.Parse(mb)
	assert.NilError(t, err)
	assert.DeepEqual(t, inside, r.Manifest)
	drift, err := manifest.Check(inside, os.DirFS(dir))
	assert.NilError(t, err)
	assert.Equal(t, len(drift), 0, "the archive is not fresh against its own contents: %v", drift)
}

// TestCheckFindsDrift: a changed file and a removed one both drift, with
// both hashes; untouched files do not.
func TestCheckFindsDrift(t *testing.T) {
	root := rootTree(t)
	r, err := Build(testSpec(t, root), t.TempDir())
	assert.NilError(t, err)
	rt, err := os.OpenRoot(root)
	assert.NilError(t, err)
	defer rt.Close()
	drift, err := manifest.Check(r.Manifest, rt.FS())
	assert.NilError(t, err)
	assert.Equal(t, len(drift), 0)

	assert.NilError(t, os.WriteFile(filepath.Join(root, "etc/nbh/boot.conf"), []byte("greeting=changed\n"), 0o644))
	assert.NilError(t, os.Remove(filepath.Join(root, "etc/hostname")))
	drift, err = manifest.Check(r.Manifest, rt.FS())
	assert.NilError(t, err)
	assert.Equal(t, len(drift), 2)
	assert.Equal(t, drift[0].Root, "/etc/hostname")
	assert.Equal(t, drift[0].Now, "")
	assert.Assert(t, strings.Contains(drift[0].String(), "root=missing"), drift[0].String())
	assert.Equal(t, drift[1].Root, "/etc/nbh/boot.conf")
	assert.Assert(t, drift[1].Now != "" && drift[1].Now != drift[1].Archive)
}

// TestTrackedFileCannotEscapeTheRoot: a tracked path that is a symlink out
// of the root tree is refused, not copied.
func TestTrackedFileCannotEscapeTheRoot(t *testing.T) {
	root := rootTree(t)
	spec := testSpec(t, root)
	spec.Tracked = append(spec.Tracked, Tracked{Path: "/etc/escape"})
	_, err := Build(spec, t.TempDir())
	assert.ErrorContains(t, err, "/etc/escape")
	spec.Tracked = []Tracked{{Path: "/../outside"}}
	_, err = Build(spec, t.TempDir())
	assert.Assert(t, err != nil, "a path above the root was read")
}

// TestPrune: the cache keeps the most recently used archives; a reused one
// counts as used.
func TestPrune(t *testing.T) {
	defer func(k int) { keepArchives = k }(keepArchives)
	keepArchives = 2
	cache := t.TempDir()
	root := rootTree(t)
	spec := testSpec(t, root)
	var paths []string
	for i := range 2 {
		spec.Secrets = map[string][]byte{"k": {byte(i)}}
		r, err := Build(spec, cache)
		assert.NilError(t, err)
		paths = append(paths, r.Path)
		time.Sleep(10 * time.Millisecond) // distinct modification times
	}
	// Reuse the first: it is now more recent than the second.
	spec.Secrets = map[string][]byte{"k": {0}}
	r, err := Build(spec, cache)
	assert.NilError(t, err)
	assert.Assert(t, r.Cached)
	time.Sleep(10 * time.Millisecond)
	spec.Secrets = map[string][]byte{"k": {3}}
	_, err = Build(spec, cache)
	assert.NilError(t, err)
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }
	assert.Assert(t, exists(paths[0]), "the recently reused archive was pruned")
	assert.Assert(t, !exists(paths[1]), "the least recently used archive survived")
	manifests, _ := filepath.Glob(filepath.Join(cache, "*.manifest.json"))
	archives, _ := filepath.Glob(filepath.Join(cache, "*.cpio.*"))
	assert.Equal(t, len(archives), 2)
	assert.Equal(t, len(manifests), 2)
}

func sha(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	assert.NilError(t, err)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// TestHugeSparseTrackedFileIsRefusedUnread: a tracked file a guest made
// 100 GiB (sparse, one truncate) fails the build by its size, and the
// freshness check reports it changed, both without reading it (reading
// would take minutes: the test's time limit is the backstop).
func TestHugeSparseTrackedFileIsRefusedUnread(t *testing.T) {
	root := rootTree(t)
	r, err := Build(testSpec(t, root), t.TempDir())
	assert.NilError(t, err)
	assert.NilError(t, os.Truncate(filepath.Join(root, "etc/nbh/boot.conf"), 100<<30))
	_, err = Build(testSpec(t, root), t.TempDir())
	assert.ErrorIs(t, err, ErrTrackedTooLarge)
	assert.ErrorContains(t, err, "/etc/nbh/boot.conf")
	rt, err := os.OpenRoot(root)
	assert.NilError(t, err)
	defer rt.Close()
	drift, err := manifest.Check(r.Manifest, rt.FS())
	assert.NilError(t, err)
	assert.Equal(t, len(drift), 1)
	assert.Equal(t, drift[0].Now, "size 107374182400")
}

// TestCacheEntriesHoldTheirKeysContent: while a tracked file flips between
// two contents during builds (a guest writing its root), every archive
// filed under a content's key holds that content. The keys come from
// builds of each content alone, and the archives' contents from their
// manifests, not from how Build computes either.
func TestCacheEntriesHoldTheirKeysContent(t *testing.T) {
	root := rootTree(t)
	conf := filepath.Join(root, "etc/nbh/boot.conf")
	contents := []string{"site=A\n", "site=EVIL\n"}
	keyOf := map[string]string{}
	for _, c := range contents {
		assert.NilError(t, os.WriteFile(conf, []byte(c), 0o644))
		r, err := Build(testSpec(t, root), t.TempDir())
		assert.NilError(t, err)
		keyOf[r.Key] = c
	}
	cache := t.TempDir()
	spec := testSpec(t, root)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			// In place, as a guest's write over NFS is.
			os.WriteFile(conf, []byte(contents[i%2]), 0o644)
		}
	}()
	for range 150 {
		r, err := Build(spec, cache)
		if err != nil {
			continue // caught mid-write: an error is no harm
		}
		want, ok := keyOf[r.Key]
		if !ok {
			continue // a content mid-write (empty, cut short): its own key
		}
		for _, e := range r.Manifest.Files {
			if e.RootPath() == "/etc/nbh/boot.conf" {
				sum := sha256.Sum256([]byte(want))
				assert.Equal(t, e.SHA256, hex.EncodeToString(sum[:]), "the archive under %s's key holds another content", strings.TrimSpace(want))
			}
		}
	}
	close(stop)
	<-done
}
