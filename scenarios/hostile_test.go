package scenarios

import (
	"context"
	"maps"
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
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/harness/timeline"
)

// TestHostileGuest boots a hostile guest next to a normal one on an
// IPsec-required network. The attacker (fixtures/attacker, in its archive,
// run by the init) fires at every service and at its neighbour: SCSI on a
// discovery session, malformed iSCSI PDUs and RPC records, mounts of what
// is not its own, forged NFS handles, SETATTR racing a symlink swap in its
// own NFS root, HTTP and TFTP traversal, the
// neighbour's boot files, a spoofed source MAC and IP, an ARP claim, an
// oversize frame, a DHCP flood, ESP garbage and replays. The neighbour
// reaches its marker, the lab survives, the attacker's own table says each
// attempt was refused (or, for blind ones, sent), and the lab's timeline
// records each refusal.
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
		Timeout:       8 * time.Minute,
		StageTimeouts: map[timeline.Stage]time.Duration{timeline.Init: 6 * time.Minute},
		Artifacts:     nbhtest.Artifacts(t, "attacker")})
	assert.NilError(t, err)
	victim, err := lab.Boot(ctx, harness.Spec{Name: "victim", Arch: "amd64", Firmware: qemu.Direct,
		MAC: victimMAC, IP: victimIP, Artifacts: nbhtest.Artifacts(t, "victim")})
	assert.NilError(t, err)

	v := victim.Wait(ctx)
	assert.Check(t, v.OK, "the victim: %v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
	a := bad.Wait(ctx)
	assert.Assert(t, a.OK, "the attacker: %v\n%s", a.Err(), strings.Join(a.Tail, "\n"))

	// The attacker's table: every attack ran and none got through.
	outcomes, details := map[string]string{}, map[string]string{}
	for _, m := range regexp.MustCompile(`nbh-attack: (\S+) (\S+) (.*)`).FindAllStringSubmatch(bad.Console(), -1) {
		outcomes[m[1]], details[m[1]] = m[2], m[3]
		t.Logf("%-24s %-8s %s", m[1], m[2], strings.TrimSpace(m[3]))
	}
	assert.Check(t, is.Contains(bad.Console(), "nbh-attack: done 18"))
	want := map[string]string{
		"own-files": "allowed", "victim-files-http": "refused", "victim-files-tftp": "refused",
		"http-traversal": "refused", "tftp-traversal": "refused", "iscsi-scsi-on-discovery": "refused",
		"iscsi-malformed-pdu": "refused", "rpc-malformed-records": "refused", "nfs-mount-elsewhere": "refused",
		"nfs-forged-handle": "refused", "nfs-symlink-swap": "sent", "spoof-source-mac": "sent", "spoof-source-ip": "sent",
		"arp-claim-victim": "sent", "oversize-frame": "sent", "dhcp-flood": "sent", "esp-garbage": "sent",
		"esp-replay": "sent",
	}
	for name, outcome := range want {
		assert.Check(t, is.Equal(outcomes[name], outcome), "attack %s", name)
	}

	// The symlink swap hit its window (some SETATTRs met the link and were
	// refused), and the host file is as it was.
	assert.Check(t, is.Regexp(`[1-9][0-9]* swaps .*: [1-9][0-9]* done, [1-9][0-9]* refused`, details["nfs-symlink-swap"]))
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
		"ARP from attacker's port claims " + victimIP, "DHCP from attacker's port for hardware address 02:ba:d0"} {
		assert.Check(t, is.Contains(spoofed, why))
	}
	assert.Check(t, len(kinds["oversize"]) > 0, "no oversize frame recorded")
	for _, kind := range []string{"esp-replay", "esp-auth", "esp-unknown-spi", "mount-refused", "refused"} {
		assert.Check(t, len(kinds[kind]) > 0, "no %s event; kinds: %v", kind, slices.Sorted(maps.Keys(kinds)))
	}
	refused := strings.Join(kinds["refused"], "\n")
	assert.Check(t, is.Contains(refused, "discovery session"))
	assert.Check(t, is.Contains(refused, "which belongs to victim"))
}
