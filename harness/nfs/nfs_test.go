package nfs

import (
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	billy "github.com/go-git/go-billy/v5"
	nfsc "github.com/willscott/go-nfs-client/nfs"
	"github.com/willscott/go-nfs-client/nfs/rpc"
	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/timeline"
)

// serve exports a small tree to 127.0.0.1 and returns a mounted client.
func serve(t *testing.T) (*nfsc.Target, string, *timeline.Timeline, *nfsc.Mount) {
	base := t.TempDir()
	root := filepath.Join(base, "root")
	outside := filepath.Join(base, "outside")
	for _, d := range []string{root, outside, filepath.Join(root, "sub")} {
		assert.NilError(t, os.MkdirAll(d, 0o755))
	}
	assert.NilError(t, os.WriteFile(filepath.Join(outside, "secret"), []byte("secret"), 0o644))
	assert.NilError(t, os.WriteFile(filepath.Join(root, "file"), []byte("inside"), 0o644))
	assert.NilError(t, os.Symlink(outside, filepath.Join(root, "out-abs")))
	assert.NilError(t, os.Symlink("../outside", filepath.Join(root, "out-rel")))

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assert.NilError(t, err)
	tl := timeline.New()
	s := Serve(ln, tl, Quota{})
	t.Cleanup(func() { s.Close() })
	s.Export("/nbh/root", "127.0.0.1", root)

	c, err := dialClient(ln.Addr().String())
	assert.NilError(t, err)
	m := &nfsc.Mount{Client: c}
	_, err = m.Mount("/nbh/nope", rpc.AuthNull)
	assert.Assert(t, err != nil, "mounted an export that does not exist")
	target, err := m.Mount("/nbh/root", rpc.AuthNull)
	assert.NilError(t, err)
	t.Cleanup(func() { m.Unmount() })
	return target, root, tl, m
}

// dialClient connects go-nfs-client, which binds a random local port of
// its own choosing: one in use by another test is tried again.
func dialClient(addr string) (*rpc.Client, error) {
	for try := 0; ; try++ {
		c, err := rpc.DialTCP("tcp", addr, false)
		if err == nil || try == 20 {
			return c, err
		}
	}
}

func read(t *testing.T, target *nfsc.Target, p string) (string, error) {
	f, err := target.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	return string(b), err
}

func TestReadWriteInsideTheExport(t *testing.T) {
	target, root, tl, _ := serve(t)
	got, err := read(t, target, "/file")
	assert.NilError(t, err)
	assert.Equal(t, got, "inside")
	_, err = target.Create("/sub/new", 0o644)
	assert.NilError(t, err)
	_, err = os.Stat(filepath.Join(root, "sub/new"))
	assert.NilError(t, err)
	var kinds []string
	for _, e := range tl.Events("") {
		kinds = append(kinds, e.Kind)
	}
	assert.DeepEqual(t, kinds, []string{"mount-refused", "mount"})
}

// TestConfinedToExport: neither "..", nor symlinks resolved by the server,
// nor a forged file handle reach outside the export.
func TestConfinedToExport(t *testing.T) {
	target, _, _, _ := serve(t)
	for _, p := range []string{"/../outside/secret", "/sub/../../outside/secret", "/out-abs/secret", "/out-rel/secret"} {
		got, err := read(t, target, p)
		assert.Assert(t, err != nil || got != "secret", "%s escaped the export: %q", p, got)
	}
	_, err := target.GetAttr([]byte("0123456789abcdef0123456789abcdef"))
	assert.Assert(t, err != nil, "a forged handle was accepted")
}

// Close cuts the connections clients left open (a guest that powered off
// never closes its own): the client sees its connection end.
func TestCloseCutsOpenConnections(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assert.NilError(t, err)
	s := Serve(ln, timeline.New(), Quota{})
	c, err := net.Dial("tcp", ln.Addr().String())
	assert.NilError(t, err)
	defer c.Close()
	time.Sleep(100 * time.Millisecond) // accepted
	done := make(chan error, 1)
	go func() { done <- s.Close() }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close hangs")
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 1))
	assert.Assert(t, err != nil && !os.IsTimeout(err), "the connection is still open: %v", err)
}

// Attribute changes act inside the export only: through a symlink that
// leads out (as a guest would swap one in between a lookup and a SETATTR)
// they fail and the file outside keeps its mode and times.
func TestAttributeChangesStayInside(t *testing.T) {
	base := t.TempDir()
	root, outside := filepath.Join(base, "root"), filepath.Join(base, "outside")
	assert.NilError(t, os.MkdirAll(root, 0o755))
	assert.NilError(t, os.MkdirAll(outside, 0o755))
	secret := filepath.Join(outside, "secret")
	assert.NilError(t, os.WriteFile(secret, []byte("x"), 0o600))
	assert.NilError(t, os.WriteFile(filepath.Join(root, "mine"), []byte("y"), 0o644))
	assert.NilError(t, os.Symlink(secret, filepath.Join(root, "link-abs")))
	assert.NilError(t, os.Symlink("../outside/secret", filepath.Join(root, "link-rel")))
	assert.NilError(t, os.Symlink("../outside", filepath.Join(root, "dir-link")))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assert.NilError(t, err)
	s := Serve(ln, timeline.New(), Quota{})
	defer s.Close()
	assert.NilError(t, s.Export("/nbh/root", "127.0.0.1", root))
	fs, ok := s.lookup("/nbh/root", "127.0.0.1")
	assert.Assert(t, ok)
	c := fs
	past := time.Unix(1000, 0)
	for _, name := range []string{"/link-abs", "link-rel", "/dir-link/secret", "/../outside/secret"} {
		assert.Check(t, c.Chmod(name, 0o777) != nil, "chmod %s", name)
		assert.Check(t, c.Chtimes(name, past, past) != nil, "chtimes %s", name)
	}
	fi, err := os.Stat(secret)
	assert.NilError(t, err)
	assert.Equal(t, fi.Mode().Perm(), os.FileMode(0o600))
	assert.Assert(t, !fi.ModTime().Equal(past))
	assert.NilError(t, c.Chmod("/mine", 0o600))
	fi, err = os.Stat(filepath.Join(root, "mine"))
	assert.NilError(t, err)
	assert.Equal(t, fi.Mode().Perm(), os.FileMode(0o600))
}

// Removing or renaming a symlink acts on the link, not on what it names,
// even when it names something outside the export.
func TestRemoveAndRenameActOnLinks(t *testing.T) {
	target, root, _, _ := serve(t)
	assert.NilError(t, target.Symlink("file", "to-file"))
	assert.NilError(t, target.Remove("to-file"))
	_, err := os.Lstat(filepath.Join(root, "to-file"))
	assert.Assert(t, os.IsNotExist(err), "the link is still there")
	_, err = os.Stat(filepath.Join(root, "file"))
	assert.NilError(t, err, "removing the link removed the file")

	// A link out of the export, renamed over a file: the link moves.
	assert.NilError(t, os.WriteFile(filepath.Join(root, "victim"), []byte("v"), 0o644))
	assert.NilError(t, target.Rename("out-abs", "victim"))
	fi, err := os.Lstat(filepath.Join(root, "victim"))
	assert.NilError(t, err)
	assert.Assert(t, fi.Mode()&os.ModeSymlink != 0, "victim is %v, not the link", fi.Mode())
	_, err = os.Lstat(filepath.Join(root, "out-abs"))
	assert.Assert(t, os.IsNotExist(err))
	secret, err := os.ReadFile(filepath.Join(filepath.Dir(root), "outside", "secret"))
	assert.NilError(t, err)
	assert.Equal(t, string(secret), "secret")
}

// TestSpecialModeBits: the client reads setuid, setgid and sticky as Unix
// mode bits (what a stock root's su and /tmp need), checked on the wire's
// mode, not through the server's own FileInfo.
func TestSpecialModeBits(t *testing.T) {
	target, root, _, _ := serve(t)
	for name, mode := range map[string]os.FileMode{"suid": 0o755 | os.ModeSetuid, "sgid": 0o755 | os.ModeSetgid} {
		p := filepath.Join(root, name)
		assert.NilError(t, os.WriteFile(p, nil, 0o755))
		assert.NilError(t, os.Chmod(p, mode))
	}
	sticky := filepath.Join(root, "tmp")
	assert.NilError(t, os.Mkdir(sticky, 0o777))
	assert.NilError(t, os.Chmod(sticky, 0o777|os.ModeSticky))
	for name, want := range map[string]uint32{"/suid": 0o4755, "/sgid": 0o2755, "/tmp": 0o1777, "/file": 0o644} {
		fi, _, err := target.Lookup(name)
		assert.NilError(t, err, name)
		attr, ok := fi.(*nfsc.Fattr)
		assert.Assert(t, ok, "%s: %T", name, fi)
		assert.Equal(t, attr.FileMode&0o7777, want, "%s: mode %o", name, attr.FileMode)
	}
}

// TestWithdrawnExportsHandlesGo: the handles given out for an export that
// was withdrawn (a closed guest's) no longer resolve, and the others do.
func TestWithdrawnExportsHandlesGo(t *testing.T) {
	s := &Server{exports: map[string]map[string]*export{}, byID: map[[8]byte]*export{}}
	h := &handler{s: s}
	dirA, dirB := t.TempDir(), t.TempDir()
	for _, d := range []string{dirA, dirB} {
		assert.NilError(t, os.MkdirAll(filepath.Join(d, "etc"), 0o755))
		assert.NilError(t, os.WriteFile(filepath.Join(d, "etc/passwd"), nil, 0o644))
	}
	assert.NilError(t, s.Export("/nbh/root", "10.0.2.15", dirA))
	assert.NilError(t, s.Export("/nbh/root", "10.0.2.16", dirB))
	fsA, fsB := s.exports["/nbh/root"]["10.0.2.15"], s.exports["/nbh/root"]["10.0.2.16"]
	ha := h.ToHandle(fsA, []string{"etc", "passwd"})
	hb := h.ToHandle(fsB, []string{"etc", "passwd"})
	s.Unexport("/nbh/root", "10.0.2.15")
	_, _, err := h.FromHandle(ha)
	assert.Assert(t, err != nil, "a withdrawn export's handle still resolves")
	f, p, err := h.FromHandle(hb)
	assert.NilError(t, err)
	assert.Assert(t, f == billy.Filesystem(fsB))
	assert.DeepEqual(t, p, []string{"etc", "passwd"})
	assert.Equal(t, len(s.byID), 1)
}
