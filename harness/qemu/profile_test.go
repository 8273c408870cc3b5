package qemu

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/images"
)

func TestKVMOnlyForTheHostArch(t *testing.T) {
	other := "arm64"
	if hostArch() == "arm64" {
		other = "amd64"
	}
	assert.Equal(t, Probe(other).Name, "tcg")
	t.Setenv("NBH_ACCEL", "tcg")
	assert.Equal(t, Probe(hostArch()).Name, "tcg")
}

// The KVM probe's guests really run and print: here under TCG (the probe
// itself asks for KVM), so a probe that passes has seen guest code run.
func TestProbeGuestsPrint(t *testing.T) {
	if testing.Short() {
		t.Skip("runs QEMU; skipped with -short")
	}
	for _, arch := range []string{"amd64", "arm64"} {
		ran, why := probeGuest(arch, Accel{Name: "tcg"}, 20*time.Second)
		assert.Assert(t, ran, "%s: %s", arch, why)
	}
	// Silence until the limit is no success.
	ran, why := probeGuest("amd64", Accel{Name: "tcg"}, time.Millisecond)
	assert.Assert(t, !ran)
	assert.Assert(t, strings.Contains(why, "no guest output within"), why)
}

// TestNICModels: the NIC's QEMU device, QEMU's own ROM kept only where the
// chain boots through it, a user's ROM wherever given.
func TestNICModels(t *testing.T) {
	device := func(c Config) string {
		c.Machine, c.MAC, c.Arch = "pc", "52:54:00:00:00:01", "amd64"
		a, err := Args(c)
		assert.NilError(t, err)
		for i, s := range a {
			if s == "-device" && strings.Contains(a[i+1], "netdev=n0") {
				return a[i+1]
			}
		}
		t.Fatalf("no NIC in %v", a)
		return ""
	}
	assert.Equal(t, device(Config{}), "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,romfile=,bootindex=1")
	assert.Equal(t, device(Config{NIC: "e1000", Profile: Profile{NICROM: true}}), "e1000,netdev=n0,mac=52:54:00:00:00:01,bootindex=1")
	assert.Equal(t, device(Config{NIC: "rtl8139", ROMFile: "/x/my.rom"}), "rtl8139,netdev=n0,mac=52:54:00:00:00:01,romfile=/x/my.rom,bootindex=1")
	_, err := Args(Config{Profile: Profile{Machine: "pc"}, NIC: "tulip3000"})
	assert.ErrorContains(t, err, `NIC "tulip3000": want one of virtio, e1000`)
}

// TestNetworks: the netdev for each kind of network the guest can be on,
// and the pinned ROMs (-L) only where the NIC's own ROM boots the guest.
func TestNetworks(t *testing.T) {
	args := func(c Config) string {
		c.Machine, c.MAC, c.Arch = "pc", "52:54:00:00:00:01", "amd64"
		a, err := Args(c)
		assert.NilError(t, err)
		return strings.Join(a, " ")
	}
	assert.Assert(t, strings.Contains(args(Config{NetFD: 3}), "-netdev stream,id=n0,addr.type=fd,addr.str=3 "))
	assert.Assert(t, strings.Contains(args(Config{TapNet: &TapNet{Netns: "ns", Ifname: "tap0"}}), "-netdev tap,id=n0,ifname=tap0,script=no,downscript=no "))
	assert.Assert(t, strings.Contains(args(Config{NetSocket: "/s/net.sock", NetReconnect: "reconnect-ms=1000"}), "-netdev stream,id=n0,server=off,addr.type=unix,addr.path=/s/net.sock,reconnect-ms=1000 "))
	for _, bad := range []string{"", "tap0,script=/evil", "a=b"} {
		_, err := Args(Config{Profile: Profile{Machine: "pc"}, TapNet: &TapNet{Ifname: bad}})
		assert.ErrorContains(t, err, "tap device")
	}
	roms := Files{ROMs: "/pinned/roms"}
	assert.Assert(t, strings.Contains(args(Config{Profile: Profile{NICROM: true}, Files: roms}), " -L /pinned/roms "))
	assert.Assert(t, !strings.Contains(args(Config{Files: roms}), "-L"), "no NIC ROM boots this chain")
	assert.Assert(t, !strings.Contains(args(Config{Profile: Profile{NICROM: true}, Files: roms, ROMFile: "/x/my.rom"}), "-L"), "the user's ROM")
}

// pinnedROMs is the amd64 QEMU and the folder of pinned iPXE ROMs (fetched
// if need be), or skips the test.
func pinnedROMs(t *testing.T) (bin, dir string) {
	bin, err := exec.LookPath(Binary("amd64"))
	if err != nil {
		t.Skip("qemu-system-x86_64 is not installed")
	}
	if testing.Short() {
		t.Skip("fetches the pinned ipxe-qemu")
	}
	cache := &images.Cache{Dir: images.DefaultDir(), Log: io.Discard}
	dir, err = cache.Path(context.Background(), "amd64", images.IPXEROMs())
	assert.NilError(t, err)
	return bin, dir
}

// TestNICROMs checks what QEMU says it loads for each NIC against the
// pinned ipxe-qemu (the ROMs guests boot through, -L): the file QEMU
// reports in its device tree is one the pinned package has, and it holds
// an EFI driver exactly when ROMHasEFI says (from the PCI expansion ROM's
// own image headers: code type 3 is EFI). On both machines the ROM chains
// use.
func TestNICROMs(t *testing.T) {
	_, dir := pinnedROMs(t)
	for _, machine := range []string{"pc", "q35"} {
		for _, n := range NICs() {
			name, err := DefaultROM("amd64", machine, n)
			assert.NilError(t, err)
			t.Logf("%s %s: %s", machine, n.Name, name)
			assert.Assert(t, name != "", "%s on %s: QEMU loads no ROM", n.Name, machine)
			rom, err := os.ReadFile(filepath.Join(dir, name))
			assert.NilError(t, err, "%s on %s", n.Name, machine)
			efi := false
			for off := 0; off+0x1a <= len(rom) && rom[off] == 0x55 && rom[off+1] == 0xaa; {
				pcir := off + int(binary.LittleEndian.Uint16(rom[off+0x18:]))
				if pcir+0x16 > len(rom) || string(rom[pcir:pcir+4]) != "PCIR" {
					break
				}
				efi = efi || rom[pcir+0x14] == 3
				if rom[pcir+0x15]&0x80 != 0 {
					break // the last image
				}
				off += int(binary.LittleEndian.Uint16(rom[pcir+0x10:])) * 512
			}
			assert.Equal(t, efi, ROMHasEFI(name), "%s: EFI image in %s", n.Name, name)
		}
	}
}

// TestParseQtree: each probed NIC gets the romfile of its own node, not a
// child's or the next device's; a NIC whose node shows none gets "".
func TestParseQtree(t *testing.T) {
	out := `bus: main-system-bus
  dev: i440FX-pcihost, id ""
    bus: pci.0
      dev: virtio-net-pci, id "nbh-probe-0"
        addr = 02.0
        romfile = "efi-virtio.rom"
        bus: virtio-bus
          dev: virtio-net-device, id ""
      dev: e1000, id "nbh-probe-1"
        addr = 03.0
      dev: PIIX4_PM, id ""
        romfile = ""
      dev: ne2k_pci, id "nbh-probe-6"
        romfile = "efi-ne2k_pci.rom"
      dev: rtl8139, id "nbh-probe-3x"
        romfile = "evil.rom"
`
	got := parseQtree(out)
	assert.DeepEqual(t, got, map[string]string{"virtio-net-pci": "efi-virtio.rom", "e1000": "", "ne2k_pci": "efi-ne2k_pci.rom"})
}

// TestROMsFolderIsWhereQEMULoadsFrom: the -L folder Args gives a NIC-ROM
// chain is where QEMU takes the NIC's default ROM from, not its own data
// folder. The folder holds a ROM of another size under the default name,
// and the size of the ROM's RAM block QEMU reports (a power of two at
// least the file's size) is the planted file's; without the folder it is
// not.
func TestROMsFolderIsWhereQEMULoadsFrom(t *testing.T) {
	bin, pinned := pinnedROMs(t)
	def, err := DefaultROM("amd64", "pc", NIC{Name: VirtioNIC, Device: "virtio-net-pci"})
	assert.NilError(t, err)
	small, err := os.ReadFile(filepath.Join(pinned, "pxe-virtio.rom")) // legacy only: smaller
	assert.NilError(t, err)
	planted := t.TempDir()
	assert.NilError(t, os.WriteFile(filepath.Join(planted, def), small, 0o644))
	block := func(roms string) int64 {
		a, err := Args(Config{Profile: Profile{Machine: "pc", NICROM: true, Arch: "amd64"}, MAC: "52:54:00:00:00:01", Files: Files{ROMs: roms}, NetFD: 3})
		assert.NilError(t, err)
		args := []string{"-M", "pc", "-S", "-nodefaults", "-display", "none", "-monitor", "stdio", "-netdev", "user,id=n0"}
		for i, s := range a {
			// The ROM folder and the NIC, as Args gives them.
			if s == "-L" || (s == "-device" && strings.Contains(a[i+1], "netdev=n0")) {
				args = append(args, s, a[i+1])
			}
		}
		cmd := exec.Command(bin, args...)
		cmd.Stdin = strings.NewReader("info ramblock\nquit\n")
		out, err := cmd.CombinedOutput()
		assert.NilError(t, err, "%s", out)
		for _, l := range strings.Split(string(out), "\n") {
			if f := strings.Fields(l); len(f) >= 6 && strings.HasSuffix(f[0], "/virtio-net-pci.rom") {
				var n int64
				_, err := fmt.Sscanf(f[len(f)-1], "0x%x", &n)
				assert.NilError(t, err, l)
				return n
			}
		}
		t.Fatalf("no ROM block for the NIC in:\n%s", out)
		return 0
	}
	pow2 := func(n int64) int64 {
		p := int64(1)
		for p < n {
			p <<= 1
		}
		return p
	}
	assert.Equal(t, block(planted), pow2(int64(len(small))), "QEMU did not load the ROM from the -L folder")
	assert.Assert(t, block("") != pow2(int64(len(small))), "the test cannot tell: QEMU's own ROM has the planted one's size")
}
