package harness

import (
	"bytes"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/bundle"
	"nbh.dev/nbh/harness/ipsec"
)

func draw(r io.Reader) []byte {
	b := make([]byte, 32)
	io.ReadFull(r, b)
	return b
}

// A replay makes the same random choices: same seed, name and MAC, same
// bytes; any of them different, other bytes.
func TestGuestRandFollowsTheSeed(t *testing.T) {
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 1}
	other := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 2}
	a := draw(guestRand("seed", "g1", mac))
	assert.DeepEqual(t, a, draw(guestRand("seed", "g1", mac)))
	for _, b := range [][]byte{draw(guestRand("seed2", "g1", mac)), draw(guestRand("seed", "g2", mac)), draw(guestRand("seed", "g1", other))} {
		assert.Assert(t, !bytes.Equal(a, b))
	}
}

func TestFromBundleRejectsWhatItCannotReplay(t *testing.T) {
	good := bundle.Bundle{Spec: bundle.Spec{Arch: "amd64", Firmware: "seabios-ipxe", Faults: []string{"no-dhcp"}, StageTimeouts: map[string]float64{"dhcp": 5}},
		Lab: bundle.Lab{Seed: "s", IPsec: &bundle.Policy{Default: "discard", Rules: []bundle.Rule{{Proto: 6, Port: 2049, Action: "protect"}}}}}
	opts, spec, err := FromBundle(&good)
	assert.NilError(t, err)
	assert.Equal(t, opts.Seed, "s")
	assert.Equal(t, opts.IPsec.Rules[0], ipsec.Rule{Proto: 6, Port: 2049, Action: ipsec.Protect})
	assert.Equal(t, spec.Faults[0].Name, "no-dhcp")
	assert.Equal(t, len(spec.StageTimeouts), 1)
	// The slots of the user's own stack come back.
	own := good
	own.Spec.Family, own.Spec.NIC, own.Spec.Steps, own.Spec.FailOn = "6", "e1000", []string{"a"}, []bundle.FailOn{{Pattern: "x", Reason: "y"}}
	own.Spec.RootDir, own.Spec.Root, own.Lab.Serve, own.Spec.RootWritable = t.TempDir(), RootNFS, t.TempDir(), true
	own.Spec.SecureBoot, own.Spec.SecureBootCerts = SecureBootOn, []string{"files/db-cert-1"}
	own.Dir = t.TempDir()
	assert.NilError(t, os.MkdirAll(filepath.Join(own.Dir, "files"), 0o755))
	assert.NilError(t, os.WriteFile(filepath.Join(own.Dir, "files", "db-cert-1"), []byte("cert"), 0o644))
	opts, spec, err = FromBundle(&own)
	assert.NilError(t, err)
	assert.Equal(t, spec.SecureBoot, SecureBootOn)
	assert.Equal(t, len(spec.SecureBootCerts), 1)
	assert.Assert(t, strings.HasSuffix(spec.SecureBootCerts[0], "files/db-cert-1"), spec.SecureBootCerts[0])
	assert.Equal(t, spec.Family, "6")
	assert.Equal(t, spec.NIC, "e1000")
	assert.DeepEqual(t, spec.Steps, []string{"a"})
	assert.DeepEqual(t, spec.FailOn, []FailOn{{Pattern: "x", Reason: "y"}})
	assert.Equal(t, spec.RootDir, own.Spec.RootDir)
	assert.Equal(t, opts.Serve, own.Lab.Serve)
	// An untrusted bundle never makes a host path writable, and says which
	// host paths it would serve.
	assert.Assert(t, !spec.RootWritable)
	assert.DeepEqual(t, HostPaths(&own), []string{own.Spec.RootDir, own.Lab.Serve})
	for name, edit := range map[string]func(*bundle.Bundle){
		"unknown chain":  func(b *bundle.Bundle) { b.Spec.Firmware = "coreboot" },
		"unknown fault":  func(b *bundle.Bundle) { b.Spec.Faults = []string{"gremlins"} },
		"unknown stage":  func(b *bundle.Bundle) { b.Spec.StageTimeouts = map[string]float64{"bios": 1} },
		"unknown action": func(b *bundle.Bundle) { b.Lab.IPsec = &bundle.Policy{Default: "maybe"} },
		"kernel outside": func(b *bundle.Bundle) { b.Spec.Kernel = "../../vmlinuz" },
		"loader outside": func(b *bundle.Bundle) { b.Spec.Loader = "../ipxe.efi" },
		"cert outside":   func(b *bundle.Bundle) { b.Spec.SecureBootCerts = []string{"../db.crt"} },
		"root gone":      func(b *bundle.Bundle) { b.Spec.RootDir = "/nonexistent/root" },
		"served gone":    func(b *bundle.Bundle) { b.Lab.Serve = "/nonexistent/tree" },
	} {
		b := good
		b.Spec.Faults = append([]string(nil), good.Spec.Faults...)
		edit(&b)
		_, _, err := FromBundle(&b)
		assert.ErrorIs(t, err, bundle.ErrBad, name)
	}
}

func TestGuestMACsNeverRepeat(t *testing.T) {
	seen := map[string]int{}
	for n := 1; n <= 0xbdff; n++ {
		mac, err := guestMAC(n)
		assert.NilError(t, err)
		if m, dup := seen[mac.String()]; dup {
			t.Fatalf("guests %d and %d share %s", m, n, mac)
		}
		seen[mac.String()] = n
	}
	first, _ := guestMAC(1)
	assert.Equal(t, first.String(), "52:54:00:4e:42:01")
	_, err := guestMAC(0xbe00)
	assert.ErrorContains(t, err, "out of MAC addresses")
}
