// Package sandisk builds the disk a guest SAN-boots from (iPXE's sanboot over
// iSCSI): a GPT disk with an EFI system partition holding the boot file the
// firmware starts (\EFI\BOOT\BOOTX64.EFI or BOOTAA64.EFI: the guest's
// Unified Kernel Image) and a second partition for the root file system,
// which the caller fills (mkfs.ext4 at Layout.RootStart).
//
// The disk is a sparse file: the ESP's 512 MiB cost what its files take.
package sandisk

import (
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	diskfs "github.com/diskfs/go-diskfs"
	"github.com/diskfs/go-diskfs/disk"
	"github.com/diskfs/go-diskfs/filesystem"
	"github.com/diskfs/go-diskfs/partition/gpt"
)

const (
	sector = 512
	align  = 1 << 20 // partitions start on MiB boundaries, as partitioning tools do
	// ESPSize is the EFI system partition's size: room for a Unified
	// Kernel Image with a stock initramfs (about 100 MB) and to spare,
	// and above 260 MiB, where FAT32 formatters (mkfs.fat, go-diskfs)
	// move from 512-byte to 4 KiB clusters: an eighth of the clusters to
	// write and for the firmware to follow.
	ESPSize = 512 << 20
)

// GUIDs are fixed, so two disks built from the same files are the same
// bytes (and a test's disk is the same from run to run).
const (
	diskGUID = "5E1F0A3C-6B2D-4C8E-9A1B-6E62682D7361" // "nbh-sa" in its last bytes
	espGUID  = "5E1F0A3C-6B2D-4C8E-9A1B-6E62682D6573"
	rootGUID = "5E1F0A3C-6B2D-4C8E-9A1B-6E62682D726F"
)

// Layout is where a disk's partitions lie, in bytes.
type Layout struct {
	ESPStart, ESPSize   int64
	RootStart, RootSize int64
	Size                int64 // the whole disk, backup GPT included
}

// Plan lays out a disk for a root of rootSize bytes (rounded up to a MiB).
func Plan(rootSize int64) Layout {
	rootSize = (rootSize + align - 1) / align * align
	l := Layout{ESPStart: align, ESPSize: ESPSize}
	l.RootStart = l.ESPStart + l.ESPSize
	l.RootSize = rootSize
	// The backup GPT (header and 128 entries) takes the last 33 sectors.
	l.Size = l.RootStart + l.RootSize + align
	return l
}

// Create writes an empty disk of layout l at img: a protective MBR and a
// GPT naming partition 1 "ESP" (EFI system) and partition 2 "nbhroot"
// (Linux file system). Both partitions are left unformatted.
func Create(img string, l Layout) error {
	if err := os.Remove(img); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("sandisk: %w", err)
	}
	d, err := diskfs.Create(img, l.Size, diskfs.SectorSize512)
	if err != nil {
		return fmt.Errorf("sandisk: create %s: %w", img, err)
	}
	defer d.Close()
	table := &gpt.Table{
		LogicalSectorSize:  sector,
		PhysicalSectorSize: sector,
		ProtectiveMBR:      true,
		GUID:               diskGUID,
		Partitions: []*gpt.Partition{
			{Index: 1, Start: uint64(l.ESPStart / sector), End: uint64((l.ESPStart+l.ESPSize)/sector - 1), Type: gpt.EFISystemPartition, Name: "ESP", GUID: espGUID},
			{Index: 2, Start: uint64(l.RootStart / sector), End: uint64((l.RootStart+l.RootSize)/sector - 1), Type: gpt.LinuxFilesystem, Name: "nbhroot", GUID: rootGUID},
		},
	}
	if err := d.Partition(table); err != nil {
		return fmt.Errorf("sandisk: partition %s: %w", img, err)
	}
	return nil
}

// WriteESP formats the disk's EFI system partition (FAT32) and copies files
// into it (path in the ESP -> host file): what was there before is gone,
// as after a reinstall of the boot files. The rest of the disk is left alone.
func WriteESP(img string, files map[string]string) error {
	d, err := diskfs.Open(img)
	if err != nil {
		return fmt.Errorf("sandisk: open %s: %w", img, err)
	}
	defer d.Close()
	fs, err := d.CreateFilesystem(disk.FilesystemSpec{Partition: 1, FSType: filesystem.TypeFat32, VolumeLabel: "ESP", Reproducible: true})
	if err != nil {
		return fmt.Errorf("sandisk: format the ESP of %s: %w", img, err)
	}
	for dst, src := range files {
		dst = "/" + strings.TrimPrefix(path.Clean("/"+dst), "/")
		if err := fs.Mkdir(path.Dir(dst)); err != nil {
			return fmt.Errorf("sandisk: ESP folder %s: %w", path.Dir(dst), err)
		}
		if err := copyIn(fs, dst, src); err != nil {
			return fmt.Errorf("sandisk: ESP file %s: %w", dst, err)
		}
	}
	return nil
}

func copyIn(fs filesystem.FileSystem, dst, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := fs.OpenFile(dst, os.O_CREATE|os.O_RDWR|os.O_TRUNC)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
