package nfs

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	nfsc "github.com/willscott/go-nfs-client/nfs"
	"github.com/willscott/go-nfs-client/nfs/rpc"

	"nbh.dev/nbh/harness/timeline"
)

// fuzzNames are the paths a hostile client tries: its own files, links
// that lead out of the export, "..", and names the fuzzer adds.
var fuzzNames = []string{"file", "sub", "sub/new", "new", "out-abs", "out-rel", "out-abs/secret",
	"out-rel/secret", "..", "../outside/secret", "sub/../..", "link-to-secret", "/", "sub/../file"}

const secretText = "SECRET-OUTSIDE-THE-EXPORT"

// tree lays out base/root (the export, with links out of it) and
// base/outside (what must stay untouched) and returns a fingerprint of
// everything outside the export.
func exportTree(t testing.TB, base string) (root string, outside func() string) {
	root = filepath.Join(base, "root")
	out := filepath.Join(base, "outside")
	for _, d := range []string{root, out, filepath.Join(root, "sub")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(out, "secret"), []byte(secretText), 0o600)
	os.WriteFile(filepath.Join(root, "file"), []byte("inside"), 0o644)
	os.Symlink(out, filepath.Join(root, "out-abs"))
	os.Symlink("../outside", filepath.Join(root, "out-rel"))
	os.Symlink("../outside/secret", filepath.Join(root, "link-to-secret"))
	return root, func() string {
		var lines []string
		filepath.WalkDir(base, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			if p == root {
				return fs.SkipDir // the export: the client's to change
			}
			fi, _ := os.Lstat(p)
			b, _ := os.ReadFile(p)
			lines = append(lines, fmt.Sprintf("%s %v %v %d %x", p, fi.Mode(), fi.ModTime().UnixNano(), fi.Size(), sha256.Sum256(b)))
			return nil
		})
		sort.Strings(lines)
		return fmt.Sprint(lines)
	}
}

// FuzzNFSSession runs a hostile client against the real server (MOUNT and
// NFS through the version gate, on TCP): the input is a list of
// operations — reads, writes, creates, removes, renames, symlinks,
// attribute changes on paths that lead out of the export, on forged
// handles, and raw RPC records — after a mount of its own export. It holds
// that nothing outside the export is read (no reply carries the secret),
// created, removed or changed (names, modes, times, contents), that the
// export of another client cannot be mounted, and that the server still
// answers afterwards.
func FuzzNFSSession(f *testing.F) {
	f.Add([]byte{0, 6, 1, 7, 2, 8, 3, 9})
	f.Add([]byte{4, 5, 0x81, 6, 0x81, 11})
	f.Add([]byte{5, 11, 0x40, 6, 7, 10, 8, 4})
	f.Add([]byte{9, 0, 0x12, 0x34, 10, 0})
	f.Add([]byte{8, 0x40, 11, 0, 0}) // chmod through a link to the secret
	f.Add(append([]byte{11, 40}, withRecordMark([]byte{0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1, 0x86, 0xa3, 0, 0, 0, 4})...))
	f.Fuzz(func(t *testing.T, ops []byte) {
		base := t.TempDir()
		root, outside := exportTree(t, base)
		other := filepath.Join(base, "other")
		os.MkdirAll(other, 0o755)
		before := outside()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		tl := timeline.New()
		s := Serve(ln, tl, Quota{})
		defer s.Close()
		s.Export("/nbh/root", "127.0.0.1", root)
		s.Export("/nbh/other", "192.0.2.9", other)

		c, err := dialClient(ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		m := &nfsc.Mount{Client: c}
		if _, err := m.Mount("/nbh/other", rpc.AuthNull); err == nil {
			t.Fatal("mounted another client's export")
		}
		target, err := m.Mount("/nbh/root", rpc.AuthNull)
		if err != nil {
			t.Fatal(err)
		}
		_, rootFH, err := target.Lookup("/")
		if err != nil {
			t.Fatal(err)
		}

		next := func() byte {
			if len(ops) == 0 {
				return 0
			}
			b := ops[0]
			ops = ops[1:]
			return b
		}
		name := func() string {
			b := next()
			if int(b) < len(fuzzNames) {
				return fuzzNames[b]
			}
			n := min(int(b)&15, len(ops))
			s := string(ops[:n])
			ops = ops[n:]
			return s
		}
		var got []byte
		for steps := 0; len(ops) > 0 && steps < 16; steps++ {
			op := next() % 12
			done := make(chan struct{})
			go func() {
				defer close(done)
				// The client library's own panics on odd replies: it is
				// not what is under test (the server's are, below).
				defer func() { recover() }()
				switch op {
				case 0: // read
					if fl, err := target.Open(name()); err == nil {
						b, _ := io.ReadAll(io.LimitReader(fl, 1<<16))
						got = append(got, b...)
						fl.Close()
					}
				case 1: // write
					if fl, err := target.OpenFile(name(), 0o644); err == nil {
						fl.Write([]byte("written"))
						fl.Close()
					}
				case 2:
					target.Create(name(), 0o644)
				case 3:
					target.Mkdir(name(), 0o755)
				case 4:
					target.Remove(name())
				case 5:
					target.RmDir(name())
				case 6:
					target.Rename(name(), name())
				case 7:
					target.Symlink(name(), name())
				case 8: // attribute changes by path
					mode := uint32(next())<<4 | 0o7
					_, fh, err := target.Lookup(name())
					if err != nil {
						return
					}
					target.SetAttr(fh, nfsc.Sattr3{Mode: nfsc.SetMode{SetIt: true, Mode: mode},
						UID: nfsc.SetUID{SetIt: next()&1 == 1, UID: 4242}, Size: nfsc.SetSize{SetIt: next()&1 == 1},
						Mtime: nfsc.SetTime{SetIt: nfsc.SetToClientTime, Time: nfsc.NFS3Time{Seconds: 1000}}})
				case 9: // a forged handle: the root's with bytes changed
					fh := bytes.Clone(rootFH)
					if len(fh) > 0 {
						fh[int(next())%len(fh)] ^= next() | 1
					}
					target.GetAttr(fh)
					target.SetAttr(fh, nfsc.Sattr3{Mode: nfsc.SetMode{SetIt: true, Mode: 0o777}})
				case 10:
					target.ReadDirPlus(name())
				case 11: // a raw record on a connection of its own
					n := min(int(next()), len(ops))
					raw(ln.Addr().String(), ops[:n])
					ops = ops[n:]
				}
			}()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatalf("operation %d did not finish", op)
			}
		}
		if bytes.Contains(got, []byte(secretText)) {
			t.Fatal("read a file outside the export")
		}
		if after := outside(); after != before {
			t.Fatalf("outside the export changed:\n%s\n%s", before, after)
		}
		if _, _, err := target.Lookup("/"); err != nil {
			t.Fatalf("the server stopped answering: %v", err)
		}
		for _, e := range tl.Events("") {
			if e.Kind == "panic" {
				t.Fatalf("the server panicked (recovered): %s", e.Msg)
			}
		}
	})
}

// raw sends b to the server on a fresh connection, as one record when it
// has no record mark of its own, and reads what comes back for a moment.
func raw(addr string, b []byte) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return
	}
	defer c.Close()
	if len(b) < 4 || binary.BigEndian.Uint32(b)&0x7fffffff > uint32(len(b)) {
		b = withRecordMark(b)
	}
	c.Write(b)
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	io.Copy(io.Discard, c)
}
