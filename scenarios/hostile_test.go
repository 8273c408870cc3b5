package scenarios

import (
	"bytes"
	"context"
	"maps"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"

	"nbh.dev/nbh/fixtures"
	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/netfab"
	"nbh.dev/nbh/harness/timeline"
)

// TestHostileGuest boots a hostile guest next to a victim with secrets on
// the server, on an IPsec-required network. The victim boots through iPXE
// from an iSCSI root with CHAP: its loader script on the server carries its
// CHAP secret, its archive its ESP keys. The attacker (fixtures/attacker,
// in its archive, run by the init) listens to everything its port gets
// while the victim boots, then fires at every service and at the victim:
// the victim's boot files in many spellings over HTTP and TFTP, DHCP in the
// victim's name (whole and in IP fragments), SCSI on a discovery session,
// malformed iSCSI PDUs and RPC records, mounts of what is not its own,
// forged NFS handles, SETATTR racing a symlink swap in its own NFS root,
// HTTP and TFTP traversal, a spoofed source MAC and IP, an ARP claim, an
// oversize frame, a DHCP flood, ESP garbage and replays. The victim boots,
// the lab survives, the attacker's table says each attempt was refused (or,
// for blind ones, sent) — and, by oracles of the test's own, the victim's
// CHAP secret appears nowhere the attacker could see (its console, its
// capture), no DHCP message in the victim's name reached the server, and
// neither guest's capture holds a frame of the other's or a DHCP reply for
// another client.
func TestHostileGuest(t *testing.T) {
	guestTest(t)
	attacker := filepath.Join(t.TempDir(), "attacker")
	assert.NilError(t, fixtures.BuildAttacker(t.Context(), "amd64", attacker))
	lab := nbhtest.NewLabWith(t, harness.Options{IPsec: ipsec.Required()})
	// A host file outside every export, which the attacker's symlinks aim
	// at while it changes attributes through its NFS root.
	hostFile := filepath.Join(t.TempDir(), "host-file")
	assert.NilError(t, os.WriteFile(hostFile, []byte("the host's"), 0o600))
	const victimMAC, victimIP = "52:54:00:4e:42:77", "10.0.2.77"
	ctx := context.Background()
	// The attacker boots through iPXE, so that it has boot files of its own
	// on the server (the control: those it may fetch).
	bad, err := lab.Boot(ctx, harness.Spec{Name: "attacker", Arch: "amd64", Firmware: "seabios-ipxe", Root: harness.RootNFS,
		ArchiveFiles: map[string]string{"bin/attacker": attacker},
		Append: "nbh.run=/bin/attacker nbh.self=attacker nbh.hostfile=" + hostFile +
			" nbh.victim=victim," + victimIP + "," + victimMAC,
		Timeout:       12 * time.Minute,
		StageTimeouts: map[timeline.Stage]time.Duration{timeline.Init: 10 * time.Minute},
		Artifacts:     nbhtest.Artifacts(t, "attacker")})
	assert.NilError(t, err)
	// The victim boots while the attacker listens.
	_, err = bad.Expect(ctx, "nbh-attack: listening")
	assert.NilError(t, err)
	victim, err := lab.Boot(ctx, harness.Spec{Name: "victim", Arch: "amd64", Firmware: "seabios-ipxe", Root: harness.RootISCSI, CHAP: true,
		MAC: victimMAC, IP: victimIP, Timeout: 6 * time.Minute, Artifacts: nbhtest.Artifacts(t, "victim")})
	assert.NilError(t, err)
	assert.NilError(t, bad.Send("go\r"))

	v := victim.Wait(ctx)
	assert.Check(t, v.OK, "the victim: %v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
	a := bad.Wait(ctx)
	assert.Assert(t, a.OK, "the attacker: %v\n%s", a.Err(), strings.Join(a.Tail, "\n"))
	victim.Close()
	bad.Close() // its capture complete

	// The attacker's table: every attack ran and none got through.
	outcomes, details := map[string]string{}, map[string]string{}
	for _, m := range regexp.MustCompile(`nbh-attack: (\S+) (\S+) (.*)`).FindAllStringSubmatch(bad.Console(), -1) {
		outcomes[m[1]], details[m[1]] = m[2], m[3]
		t.Logf("%-24s %-8s %s", m[1], m[2], strings.TrimSpace(m[3]))
	}
	assert.Check(t, is.Contains(bad.Console(), "nbh-attack: done 21"))
	want := map[string]string{
		"own-files": "allowed", "victim-files-http": "refused", "victim-files-tftp": "refused",
		"http-traversal": "refused", "tftp-traversal": "refused", "iscsi-scsi-on-discovery": "refused",
		"iscsi-malformed-pdu": "refused", "rpc-malformed-records": "refused", "nfs-mount-elsewhere": "refused",
		"nfs-forged-handle": "refused", "nfs-symlink-swap": "sent", "spoof-source-mac": "sent", "spoof-source-ip": "sent",
		"arp-claim-victim": "sent", "oversize-frame": "sent", "dhcp-flood": "sent", "esp-garbage": "sent",
		"esp-replay": "sent", "dhcp-for-victim": "sent", "dhcp-for-victim-fragmented": "sent", "sniff": "refused",
	}
	for name, outcome := range want {
		assert.Check(t, is.Equal(outcomes[name], outcome), "attack %s", name)
	}

	// The symlink swap ran (links renamed over the file, SETATTRs on its
	// handle refused: since handles are bound to the file, the first swap
	// made the handle stale), and the host file is as it was.
	assert.Check(t, is.Regexp(`[1-9][0-9]* swaps .*: [0-9]+ done, [1-9][0-9]* refused`, details["nfs-symlink-swap"]))
	fi, err := os.Stat(hostFile)
	assert.NilError(t, err)
	assert.Check(t, is.Equal(fi.Mode().Perm(), os.FileMode(0o600)), "the host file's mode changed")

	// The lab's side: each refusal recorded, nothing panicked.
	kinds := map[string][]string{}
	for _, e := range lab.Timeline().Events("") {
		kinds[e.Kind] = append(kinds[e.Kind], e.Source+": "+e.Msg)
		assert.Check(t, e.Kind != "panic", "the lab panicked: %s", e.Msg)
	}
	spoofed := strings.Join(kinds["spoofed"], "\n")
	for _, why := range []string{"source MAC " + victimMAC, "IPv4 from attacker's port with source " + victimIP,
		"ARP from attacker's port claims " + victimIP, "DHCP from attacker's port for hardware address 02:ba:d0",
		"a fragmented DHCP message from attacker's port"} {
		assert.Check(t, is.Contains(spoofed, why))
	}
	assert.Check(t, len(kinds["oversize"]) > 0, "no oversize frame recorded")
	for _, kind := range []string{"esp-replay", "esp-auth", "esp-unknown-spi", "mount-refused", "refused"} {
		assert.Check(t, len(kinds[kind]) > 0, "no %s event; kinds: %v", kind, slices.Sorted(maps.Keys(kinds)))
	}
	refused := strings.Join(kinds["refused"], "\n")
	assert.Check(t, is.Contains(refused, "discovery session"))
	assert.Check(t, is.Contains(refused, "which belongs to victim"))

	// The test's own oracles, which do not ask the lab how it decided.
	// The victim's CHAP secret (its kernel says its command line) is
	// nowhere the attacker could see.
	m := regexp.MustCompile(`netroot=iscsi:[^:@\s]+:([0-9a-f]{8,})@`).FindStringSubmatch(victim.Console())
	assert.Assert(t, m != nil, "no CHAP secret on the victim's command line")
	secret := m[1]
	assert.Check(t, !strings.Contains(bad.Console(), secret), "the victim's CHAP secret is on the attacker's console")
	raw, err := os.ReadFile(filepath.Join(bad.Dir, "network.pcapng"))
	assert.NilError(t, err)
	assert.Check(t, !strings.Contains(string(raw), secret), "the victim's CHAP secret crossed the attacker's port")
	// No DHCP message in the victim's name from the attacker reached the
	// DHCP server: whole or in fragments (their transaction IDs).
	for _, e := range lab.Timeline().Events("") {
		if x, _ := e.Detail["xid"].(string); e.Source == "dhcp" && (x == "0x0badf00d" || x == "0x0badf00e") {
			t.Errorf("the attacker's DHCP in the victim's name reached the server: %s %s %s", e.Kind, x, e.Msg)
		}
	}
	// Each guest's port delivered nothing of the other's and no DHCP
	// reply for another client.
	for _, g := range []*harness.Guest{bad, victim} {
		other := victim.MAC
		if g == victim {
			other = bad.MAC
		}
		frames, err := netfab.ReadCapture(filepath.Join(g.Dir, "network.pcapng"))
		assert.NilError(t, err)
		assert.Assert(t, len(frames) > 0)
		inbound := 0
		for _, f := range frames {
			d := f.Data
			if !f.Inbound || len(d) < 14 {
				continue // sent by the guest itself (spoofed ones too)
			}
			inbound++
			assert.Check(t, !bytes.Equal(d[6:12], other) && !bytes.Equal(d[0:6], other), "%s's port delivered a frame of or for %s: % x", g.Name, other, d[:14])
			if ch, ok := dhcpReplyClient(d); ok {
				assert.Check(t, bytes.Equal(ch, g.MAC), "%s's port delivered a DHCP reply for %s", g.Name, ch)
			}
		}
		assert.Check(t, inbound > 0, "%s's capture shows nothing delivered", g.Name)
	}
}

// dhcpReplyClient is the client hardware address of a frame that carries a
// DHCP server's reply (IPv4, UDP 67 to 68), read by the test itself.
func dhcpReplyClient(f []byte) (net.HardwareAddr, bool) {
	if len(f) < 34 || f[12] != 0x08 || f[13] != 0x00 || f[23] != 17 {
		return nil, false
	}
	l4 := 14 + int(f[14]&0x0f)*4
	if len(f) < l4+8+34 || f[l4] != 0 || f[l4+1] != 67 || f[l4+2] != 0 || f[l4+3] != 68 {
		return nil, false
	}
	return net.HardwareAddr(f[l4+8+28 : l4+8+34]), true
}
