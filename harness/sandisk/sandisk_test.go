package sandisk

import (
	"bytes"
	"crypto/rand"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	diskfs "github.com/diskfs/go-diskfs"
	"github.com/diskfs/go-diskfs/partition/gpt"
)

// TestDiskReadsBack builds a disk with an ext4 root (the real mkfs.ext4,
// as the lab makes it) and a file in the ESP, and reads both back: the
// table, the file's bytes, and the ext4 superblock where the root lies.
func TestDiskReadsBack(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	l := Plan(40<<20 + 5)
	if l.RootSize != 41<<20 || l.RootStart != l.ESPStart+ESPSize || l.Size != l.RootStart+l.RootSize+align {
		t.Fatalf("layout %+v", l)
	}
	if err := Create(img, l); err != nil {
		t.Fatal(err)
	}
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		t.Skip("mkfs.ext4 (e2fsprogs) is not installed")
	}
	if out, err := exec.Command(mkfs, "-q", "-F", "-E", "offset="+itoa(l.RootStart)+",nodiscard", img, itoa(l.RootSize/1024)+"k").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	boot := make([]byte, 3<<20+17)
	rand.Read(boot)
	src := filepath.Join(dir, "boot.efi")
	os.WriteFile(src, boot, 0o644)
	if err := WriteESP(img, map[string]string{"EFI/BOOT/BOOTX64.EFI": src}); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(img); fi.Size() != l.Size {
		t.Fatalf("disk is %d bytes, want %d", fi.Size(), l.Size)
	}

	d, err := diskfs.Open(img, diskfs.WithOpenMode(diskfs.ReadOnly))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	pt, err := d.GetPartitionTable()
	if err != nil {
		t.Fatal(err)
	}
	parts := pt.(*gpt.Table).Partitions
	if len(parts) < 2 || parts[0].Type != gpt.EFISystemPartition || parts[1].Type != gpt.LinuxFilesystem ||
		int64(parts[1].Start)*sector != l.RootStart {
		t.Fatalf("partitions: %+v", parts)
	}
	fs, err := d.GetFilesystem(1)
	if err != nil {
		t.Fatal(err)
	}
	f, err := fs.OpenFile("/EFI/BOOT/BOOTX64.EFI", os.O_RDONLY)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(f)
	if !bytes.Equal(got, boot) {
		t.Fatalf("ESP file: %d bytes back, want the %d written", len(got), len(boot))
	}
	raw, _ := os.ReadFile(img)
	if m := raw[l.RootStart+1024+56 : l.RootStart+1024+58]; m[0] != 0x53 || m[1] != 0xef {
		t.Fatalf("no ext4 superblock at the root partition: % x", m)
	}
	// A second ESP write (the next boot's image) replaces the first.
	os.WriteFile(src, []byte("small"), 0o644)
	if err := WriteESP(img, map[string]string{"EFI/BOOT/BOOTX64.EFI": src}); err != nil {
		t.Fatal(err)
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
