package manifest

import (
	"os"
	"path/filepath"
	"testing"
)

// TestCheckStaysInsideTheRoot: through an os.Root, a tracked path that is a
// symlink out of the root reads as an error, not as the outside file.
func TestCheckStaysInsideTheRoot(t *testing.T) {
	base := t.TempDir()
	root := filepath.Join(base, "root")
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(base, "outside"), []byte("x"), 0o644)
	os.Symlink("../../outside", filepath.Join(root, "etc/link"))
	h, _ := HashFile(filepath.Join(base, "outside"))
	m := Manifest{Files: []Entry{{Path: "/etc/link", SHA256: h, Source: RootPrefix + "/etc/link"}}}
	r, err := os.OpenRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if d, err := Check(m, r.FS()); err == nil && len(d) == 0 {
		t.Fatal("the check read a file outside the root as the tracked one")
	}
}

func TestParseRoundTrip(t *testing.T) {
	m := Manifest{Kernel: "6.1.0-56-amd64", Compression: "zstd", Files: []Entry{
		{Path: "/z", Size: 1, SHA256: "aa"},
		{Path: "/etc/nbh/boot.conf", Size: 2, SHA256: "bb", Source: "root:/etc/nbh/boot.conf", Editable: true},
		{Path: "/etc/nbh/key", Size: 16, SHA256: "cc", Secret: true},
	}}
	got, err := Parse(m.Marshal())
	if err != nil {
		t.Fatal(err)
	}
	if got.Files[0].Path != "/etc/nbh/boot.conf" || len(got.Tracked()) != 1 || !got.Files[1].Secret {
		t.Fatalf("round trip: %+v", got)
	}
	if _, err := Parse([]byte("{")); err == nil {
		t.Fatal("a broken manifest parsed")
	}
	if e, ok := got.Lookup("etc/nbh/../nbh/boot.conf"); !ok || !e.Editable {
		t.Fatal("lookup by an uncleaned path failed")
	}
}
