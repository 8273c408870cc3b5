package qemu

import (
	"os"
	"path/filepath"
	"testing"

	"gotest.tools/v3/assert"
)

// Two guests of one machine have one key, whatever their private paths;
// each thing that changes what the machine does before its first request
// on the network changes it: the content (not the name) of the firmware,
// of the variables the guest's copy starts as, of an option ROM folder;
// the NIC, its MAC, the memory, a firmware setting, the acceleration.
func TestSnapshotKey(t *testing.T) {
	if _, err := binaryID("arm64"); err != nil {
		t.Skip(err)
	}
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		assert.NilError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		assert.NilError(t, os.WriteFile(p, []byte(content), 0o644))
		return p
	}
	base := Config{
		Profile: Profile{Arch: "arm64", Firmware: "aavmf-http", Machine: "virt", Load: LoadPflash},
		Accel:   Accel{Name: "tcg"}, MAC: "52:54:00:4e:42:01",
		Files: Files{Code: write("code.fd", "CODE"), Vars: write("vars.fd", "VARS")},
		Dir:   "/a/private", QMP: "/a/private/qmp.sock",
	}
	key := func(c Config) string {
		k, err := SnapshotKey(c)
		assert.NilError(t, err)
		return k
	}
	k0 := key(base)

	same := base
	same.Dir, same.QMP = "/b/elsewhere", "/b/elsewhere/qmp"
	same.Files.Code = write("copy/code.fd", "CODE")
	same.Files.Vars = write("copy/vars.fd", "VARS")
	assert.Equal(t, key(same), k0, "the same machine from other paths")

	for name, change := range map[string]func(c *Config){
		"firmware content": func(c *Config) { c.Files.Code = write("code2.fd", "CODE2") },
		"variables":        func(c *Config) { c.Files.Vars = write("vars2.fd", "VARS2") },
		"nic":              func(c *Config) { c.NIC = "e1000" },
		"mac":              func(c *Config) { c.MAC = "52:54:00:4e:42:02" },
		"memory":           func(c *Config) { c.Memory = 2048 },
		"fw_cfg":           func(c *Config) { c.FwCfg = [][2]string{{"opt/org.tianocore/IPv4PXESupport", "no"}} },
		"accel":            func(c *Config) { c.Accel = Accel{Name: "kvm"} },
		"rom folder": func(c *Config) {
			c.Profile.NICROM = true
			c.Files.ROMs = filepath.Dir(write("roms/efi-virtio.rom", "ROM"))
		},
		"user's rom": func(c *Config) { c.ROMFile = write("my.rom", "MINE") },
	} {
		c := base
		change(&c)
		assert.Assert(t, key(c) != k0, "%s does not change the key", name)
	}
	// A ROM folder's content, not its name.
	a, b := base, base
	a.NICROM, b.NICROM = true, true
	a.Files.ROMs = filepath.Dir(write("r1/efi-virtio.rom", "ROM"))
	b.Files.ROMs = filepath.Dir(write("r2/efi-virtio.rom", "ROM"))
	assert.Equal(t, key(a), key(b))
	write("r2/efi-virtio.rom", "ROM, rebuilt")
	assert.Assert(t, key(a) != key(b))

	// Nothing written: the guest's copy of the variables is not made.
	_, err := os.Stat("/a/private")
	assert.Assert(t, os.IsNotExist(err))
	c := base
	c.NetSocket = "/x.sock"
	_, err = SnapshotKey(c)
	assert.ErrorContains(t, err, "only a guest on an inherited stream socket")
}
