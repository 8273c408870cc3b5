package scenarios

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"

	"nbh.dev/nbh/fixtures"
	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/netfab"
	"nbh.dev/nbh/harness/nfs"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/internal/rules"
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
// files made through a link out of it, writes and files past its quota,
// HTTP and TFTP traversal, a spoofed source MAC and IP, an ARP claim,
// neighbor discovery in the victim's name, a router advertisement, TCP to
// the ESP-only services over IPv6 in clear, an oversize frame, a DHCP
// flood, ESP garbage and replays. The victim boots, the lab survives, the
// attacker's table says each attempt was refused (or, for blind ones,
// sent) — and, by oracles of the test's own, the victim's CHAP secret
// appears nowhere the attacker could see (its console, its capture) nor in
// any DHCP reply, no DHCP message in the victim's name reached the server,
// nothing appeared in the host folder the attacker's links aim at, and
// neither guest's capture holds a frame of the other's, a DHCP reply for
// another client, or an answer in clear from an ESP-only service.
//
// Each check names the isolation rule (internal/rules) it stands for: make
// negative-controls-hostile runs this test with each rule the attacker can
// reach switched off, and wants a failure naming that rule.
func TestHostileGuest(t *testing.T) {
	guestTest(t)
	attacker := filepath.Join(t.TempDir(), "attacker")
	assert.NilError(t, fixtures.BuildAttacker(t.Context(), "amd64", attacker))
	// A small NFS quota, which the attacker tries to pass.
	lab := nbhtest.NewLabWith(t, harness.Options{IPsec: ipsec.Required(), NFSQuota: nfs.Quota{Bytes: 8 << 20, Files: 400}})
	// A host file outside every export, alone in its folder, which the
	// attacker's symlinks aim at while it changes attributes and makes
	// files through its NFS root.
	hostDir := t.TempDir()
	hostFile := filepath.Join(hostDir, "host-file")
	assert.NilError(t, os.WriteFile(hostFile, []byte("the host's"), 0o600))
	const victimMAC, victimIP = "52:54:00:4e:42:77", "10.0.2.77"
	ctx := context.Background()
	// The attacker boots through iPXE, so that it has boot files of its own
	// on the server (the control: those it may fetch), and stays up at a
	// shell after its marker (Shell): its port is there to receive what the
	// server may send it in the victim's name after its claims.
	bad, victim := hostileBoot(t, lab, harness.Spec{Name: "attacker", Arch: "amd64", Firmware: "seabios-ipxe", Root: harness.RootNFS, Shell: true,
		ArchiveFiles: map[string]string{"bin/attacker": attacker},
		Append: "nbh.run=/bin/attacker nbh.self=attacker nbh.hostfile=" + hostFile + " nbh.server6=" + lab.Server6() +
			" nbh.victim=victim," + victimIP + "," + victimMAC,
		Timeout:       12 * time.Minute,
		StageTimeouts: map[timeline.Stage]time.Duration{timeline.Init: 10 * time.Minute},
		Artifacts:     nbhtest.Artifacts(t, "attacker")},
		harness.Spec{Name: "victim", Arch: "amd64", Firmware: "seabios-ipxe", Root: harness.RootISCSI, CHAP: true,
			Shell: true, MAC: victimMAC, IP: victimIP, Timeout: 6 * time.Minute, Artifacts: nbhtest.Artifacts(t, "victim")})
	// After the attacker's ARP claims, the victim reads its iSCSI root
	// (through ESP): a server that believed a claim sends the answers to
	// the attacker's port, and the victim's command never ends.
	_, err := victim.Expect(ctx, `nbh-root# $`)
	assert.NilError(t, err)
	rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	out, status, err := victim.Run(rctx, "echo 3 > /proc/sys/vm/drop_caches; find / -xdev | wc -l")
	cancel()
	holds(t, rules.PortSource, err == nil && status == 0, "the victim could not read its root after the attacker's claims: %v %d %q", err, status, out)
	victim.Close()
	bad.Close() // its capture complete

	want := map[string]struct{ outcome, rule string }{
		"own-files":                  {"allowed", ""}, // the control
		"victim-files-http":          {"refused", rules.PathOwner},
		"victim-files-tftp":          {"refused", rules.PathOwner},
		"http-traversal":             {"refused", ""},
		"tftp-traversal":             {"refused", ""},
		"iscsi-scsi-on-discovery":    {"refused", ""},
		"iscsi-malformed-pdu":        {"refused", ""},
		"rpc-malformed-records":      {"refused", ""},
		"nfs-mount-elsewhere":        {"refused", ""},
		"nfs-forged-handle":          {"refused", ""}, // a made-up handle is in no table, whatever the rule
		"nfs-symlink-swap":           {"sent", ""},    // how its SETATTRs were refused names the rule, below
		"nfs-create-through-link":    {"refused", rules.NFSExport},
		"nfs-quota-bytes":            {"refused", rules.NFSQuota},
		"nfs-quota-files":            {"refused", rules.NFSQuota},
		"ipv6-clear-to-services":     {"refused", rules.IPv6Policy},
		"ndp-claim-victim":           {"sent", ""}, // blind: the records below
		"router-advertisement":       {"sent", ""},
		"spoof-source-mac":           {"sent", ""},
		"spoof-source-ip":            {"sent", ""},
		"arp-claim-victim":           {"sent", ""},
		"oversize-frame":             {"sent", ""},
		"dhcp-flood":                 {"sent", ""},
		"esp-garbage":                {"sent", ""},
		"esp-replay":                 {"sent", ""},
		"dhcp-for-victim":            {"sent", ""},
		"dhcp-for-victim-fragmented": {"sent", ""},    // dropped by the IPsec gateway too: TestHostileGuestClear
		"sniff":                      {"refused", ""}, // the captures below name the rule
	}
	details := attackTable(t, bad, want)

	// The symlink swap ran (links renamed over the file), and the host
	// file is as it was (SETATTR goes through the export's os.Root whatever
	// the rules). Every SETATTR on the file's handle after the first swap
	// was refused as stale: the handle names the file, not the name (one
	// may meet the link in the instant of that first swap).
	swap := regexp.MustCompile(`([0-9]+) swaps .*: ([0-9]+) done, ([0-9]+) refused \(([0-9]+) stale\), ([0-9]+) unanswered`).FindStringSubmatch(details["nfs-symlink-swap"])
	if assert.Check(t, swap != nil, "nfs-symlink-swap: %q", details["nfs-symlink-swap"]) {
		n := func(i int) int { x, _ := strconv.Atoi(swap[i]); return x }
		assert.Check(t, n(1) > 0 && n(3)+n(5) > 0, "the swap did not run: %s", swap[0])
		holds(t, rules.NFSHandles, n(3)+n(5)-n(4) <= 1, "SETATTRs on a swapped name's handle not refused as stale: %s", swap[0])
	}
	fi, err := os.Stat(hostFile)
	assert.NilError(t, err)
	assert.Check(t, fi.Mode().Perm() == 0o600, "the host file's mode changed to %v", fi.Mode().Perm())
	// Nothing was made in the host folder through the attacker's links
	// (a CREATE that opens through them would).
	entries, err := os.ReadDir(hostDir)
	assert.NilError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	holds(t, rules.NFSExport, slices.Equal(names, []string{"host-file"}), "the host folder holds %v", names)

	// The lab's side: each refusal recorded, nothing panicked.
	kinds := map[string][]string{}
	for _, e := range lab.Timeline().Events("") {
		kinds[e.Kind] = append(kinds[e.Kind], e.Source+": "+e.Msg)
		assert.Check(t, e.Kind != "panic", "the lab panicked: %s", e.Msg)
	}
	spoofed := strings.Join(kinds["spoofed"], "\n")
	for _, r := range []struct{ rule, why string }{
		{rules.PortSource, "source MAC " + victimMAC},
		{rules.PortSource, "IPv4 from attacker's port with source " + victimIP},
		{rules.PortSource, "ARP from attacker's port claims " + victimIP},
		{rules.DHCPSnooping, "DHCP from attacker's port for hardware address 02:ba:d0"},
		{rules.DHCPSnooping, "a fragmented DHCP message from attacker's port"},
		{rules.NDP, "a neighbor advertisement from attacker's port for " + linkLocalOf(t, victimMAC)},
		{rules.NDP, "naming link-layer address " + victimMAC},
		{rules.RouterMessages, "ICMPv6 type 134 (a router's) from attacker's port"},
	} {
		holds(t, r.rule, strings.Contains(spoofed, r.why), "no frame recorded as spoofed for %q", r.why)
	}
	assert.Check(t, len(kinds["oversize"]) > 0, "no oversize frame recorded")
	for _, kind := range []string{"esp-replay", "esp-auth", "esp-unknown-spi", "mount-refused", "refused"} {
		assert.Check(t, len(kinds[kind]) > 0, "no %s event; kinds: %v", kind, slices.Sorted(maps.Keys(kinds)))
	}
	refused := strings.Join(kinds["refused"], "\n")
	assert.Check(t, is.Contains(refused, "discovery session"))
	holds(t, rules.PathOwner, strings.Contains(refused, "which belongs to victim"), "no fetch of the victim's files recorded as refused")

	// The test's own oracles, which do not ask the lab how it decided.
	// The victim's CHAP secret (its kernel says its command line) is
	// nowhere the attacker could see, and in no DHCP reply.
	m := regexp.MustCompile(`netroot=iscsi:[^:@\s]+:([0-9a-f]{8,})@`).FindStringSubmatch(victim.Console())
	assert.Assert(t, m != nil, "no CHAP secret on the victim's command line")
	secret := []byte(m[1])
	assert.Check(t, !bytes.Contains([]byte(bad.Console()), secret), "the victim's CHAP secret is on the attacker's console")
	raw, err := os.ReadFile(filepath.Join(bad.Dir, "network.pcapng"))
	assert.NilError(t, err)
	assert.Check(t, !bytes.Contains(raw, secret), "the victim's CHAP secret crossed the attacker's port")
	noDHCPForVictim(t, lab)
	checkCaptures(t, bad, victim, secret, true)
	// The server answered nothing of what the attacker sent in the
	// victim's name: no TFTP answer to the request from the victim's
	// address reached the victim, and nothing for the victim's address
	// reached the attacker (after its ARP claims).
	for _, f := range inbound(t, victim) {
		if sport, dport, ok := udp4Ports(f); ok && sport == 69 && dport == 40001 {
			holds(t, rules.PortSource, false, "the victim's port delivered TFTP's answer to a request the attacker sent from the victim's address")
		}
	}
	for _, f := range inbound(t, bad) {
		if len(f) >= 34 && f[12] == 0x08 && f[13] == 0x00 && net.IP(f[30:34]).Equal(net.ParseIP(victimIP)) {
			holds(t, rules.PortSource, false, "the attacker's port delivered an IPv4 packet for the victim's address: % x", f[:34])
			break
		}
	}
}

// hostileBoot boots the attacker (it listens from when its init runs it),
// then the victim, and once the victim has reached its marker types the
// attacker's go-ahead and waits for the attacker's marker. The attacker
// fires only then: the victim's files are all on the server, and the
// victim stays up at its shell (Spec.Shell); a fetch while the lab still
// builds them would be refused with the rule off too, for want of the
// file (the negative control showed it).
func hostileBoot(t *testing.T, lab *harness.Lab, attacker, victim harness.Spec) (bad, vic *harness.Guest) {
	t.Helper()
	ctx := context.Background()
	bad, err := lab.Boot(ctx, attacker)
	assert.NilError(t, err)
	_, err = bad.Expect(ctx, "nbh-attack: listening")
	assert.NilError(t, err)
	vic, err = lab.Boot(ctx, victim)
	assert.NilError(t, err)
	v := vic.Wait(ctx)
	assert.Check(t, v.OK, "the victim: %v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
	assert.NilError(t, bad.Send("go\r"))
	a := bad.Wait(ctx)
	assert.Assert(t, a.OK, "the attacker: %v\n%s", a.Err(), strings.Join(a.Tail, "\n"))
	return bad, vic
}

// attackTable reads the attacker's table from its console, after checking
// that it started and finished, and checks each attack's outcome: a
// wrong one names the attack's rule; one it could not make (ERROR, or
// missing) is a failure of the test, naming no rule. It returns the
// attacks' details.
func attackTable(t *testing.T, bad *harness.Guest, want map[string]struct{ outcome, rule string }) map[string]string {
	t.Helper()
	outcomes, details := map[string]string{}, map[string]string{}
	for _, m := range regexp.MustCompile(`nbh-attack: (\S+) (\S+) (.*)`).FindAllStringSubmatch(bad.Console(), -1) {
		outcomes[m[1]], details[m[1]] = m[2], m[3]
		t.Logf("%-28s %-8s %s", m[1], m[2], strings.TrimSpace(m[3]))
	}
	assert.Assert(t, outcomes["setup"] == "", "the attacker could not start: %s", details["setup"])
	assert.Assert(t, is.Contains(bad.Console(), fmt.Sprintf("nbh-attack: done %d", len(want))))
	for name, w := range want {
		switch got := outcomes[name]; got {
		case "", "ERROR":
			t.Errorf("attack %s could not be made: %q %s", name, got, details[name])
		default:
			holds(t, w.rule, got == w.outcome, "attack %s: %q, want %q (%s)", name, got, w.outcome, details[name])
		}
	}
	return details
}

// noDHCPForVictim: no DHCP message in the victim's name from the attacker
// reached the DHCP server, whole or in fragments (the server's own events,
// by the attacker's transaction IDs).
func noDHCPForVictim(t *testing.T, lab *harness.Lab) {
	t.Helper()
	for _, e := range lab.Timeline().Events("") {
		if x, _ := e.Detail["xid"].(string); e.Source == "dhcp" && (x == "0x0badf00d" || x == "0x0badf00e") {
			holds(t, rules.DHCPSnooping, false, "the attacker's DHCP in the victim's name reached the server: %s %s %s", e.Kind, x, e.Msg)
		}
	}
}

// inbound is what g's port delivered to it, from its capture.
func inbound(t *testing.T, g *harness.Guest) [][]byte {
	t.Helper()
	frames, err := netfab.ReadCapture(filepath.Join(g.Dir, "network.pcapng"))
	assert.NilError(t, err)
	var in [][]byte
	for _, f := range frames {
		if f.Inbound && len(f.Data) >= 14 {
			in = append(in, f.Data)
		}
	}
	return in
}

// udp4Ports are the ports of a frame carrying UDP over IPv4 (a first or
// only fragment), read by the test itself.
func udp4Ports(f []byte) (sport, dport uint16, ok bool) {
	if len(f) < 34 || f[12] != 0x08 || f[13] != 0x00 || f[23] != 17 || (uint16(f[20])<<8|uint16(f[21]))&0x1fff != 0 {
		return 0, 0, false
	}
	l4 := 14 + int(f[14]&0x0f)*4
	if len(f) < l4+4 {
		return 0, 0, false
	}
	return uint16(f[l4])<<8 | uint16(f[l4+1]), uint16(f[l4+2])<<8 | uint16(f[l4+3]), true
}

// checkCaptures reads both guests' captures, by the test's own parsing:
// each guest's port delivered nothing of the other's, no DHCP reply for
// another client, no DHCP reply with the victim's secret, and, on a
// network whose IPsec policy makes the root services ESP-only (espOnly),
// nothing in clear over IPv6 from them.
func checkCaptures(t *testing.T, bad, victim *harness.Guest, secret []byte, espOnly bool) {
	t.Helper()
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
			holds(t, rules.ProtectedPorts, !bytes.Equal(d[6:12], other) && !bytes.Equal(d[0:6], other), "%s's port delivered a frame of or for %s: % x", g.Name, other, d[:14])
			if ch, ok := dhcpReplyClient(d); ok {
				holds(t, rules.DHCPToOwner, bytes.Equal(ch, g.MAC), "%s's port delivered a DHCP reply for %s", g.Name, ch)
				holds(t, rules.NoSecretInDHCP, !bytes.Contains(d, secret), "%s's port delivered a DHCP reply with the victim's CHAP secret", g.Name)
			}
			if port, ok := tcp6From(d); ok && (port == 111 || port == 2049 || port == 3260) && espOnly {
				holds(t, rules.IPv6Policy, false, "%s's port delivered TCP over IPv6 from port %d, which is ESP-only", g.Name, port)
			}
		}
		assert.Check(t, inbound > 0, "%s's capture shows nothing delivered", g.Name)
	}
}

// TestHostileGuestClear boots the attacker (on an iSCSI root of its own)
// next to a SAN-booting victim with CHAP on a clear dual-stack network,
// where IPv6 reaches the host (on
// TestHostileGuest's IPsec network none does, so the DHCPv6 server is out
// of its reach; and a SAN boot needs a clear network: no loader does ESP).
// The victim's loader script on the server holds its SAN CHAP secret. The
// attacker asks for the victim's boot files in many spellings over HTTP and
// TFTP, logs in to its own iSCSI target and leaves 48 MiB of writes waiting
// for their data, opens 12 iSCSI connections at once, asks DHCPv6 in the victim's name (its DUID) from a link-local
// address that is no MAC's EUI-64, from its own, and in two fragments, and
// sends neighbor discovery and a router advertisement in the victim's
// name. The lab records each; by the test's own oracles, the victim's SAN
// CHAP secret (read from the loader script in the victim's own capture) is
// nowhere the attacker could see nor in any DHCP reply, no DHCPv6 message
// was taken for the victim's (the victim, booting over IPv4, sends none),
// and the captures hold nothing of the other guest's.
func TestHostileGuestClear(t *testing.T) {
	guestTest(t)
	attacker := filepath.Join(t.TempDir(), "attacker")
	assert.NilError(t, fixtures.BuildAttacker(t.Context(), "amd64", attacker))
	lab := nbhtest.NewLab(t)
	const victimMAC, victimIP = "52:54:00:4e:42:78", "10.0.2.78"
	bad, victim := hostileBoot(t, lab, harness.Spec{Name: "attacker", Arch: "amd64", Firmware: "direct", Root: harness.RootISCSI,
		ArchiveFiles: map[string]string{"bin/attacker": attacker},
		Append: "nbh.run=/bin/attacker nbh.self=attacker nbh.attacks=clear nbh.server6=" + lab.Server6() +
			" nbh.victim=victim," + victimIP + "," + victimMAC,
		Timeout: 10 * time.Minute, StageTimeouts: map[timeline.Stage]time.Duration{timeline.Init: 8 * time.Minute},
		Artifacts: nbhtest.Artifacts(t, "attacker")},
		harness.Spec{Name: "victim", Arch: "amd64", Firmware: "ovmf-ipxe", Root: harness.RootSANBoot, CHAP: true,
			Shell: true, MAC: victimMAC, IP: victimIP, Timeout: 6 * time.Minute, Artifacts: nbhtest.Artifacts(t, "victim")})
	victim.Close()
	bad.Close()

	want := map[string]struct{ outcome, rule string }{
		"victim-files-http":            {"refused", rules.PathOwner},
		"victim-files-tftp":            {"refused", rules.PathOwner},
		"iscsi-pending-writes":         {"refused", rules.ISCSIMemory},
		"iscsi-connections":            {"refused", rules.ISCSIMemory},
		"dhcp-for-victim":              {"sent", ""},
		"dhcp-for-victim-fragmented":   {"sent", ""},
		"dhcpv6-for-victim":            {"sent", ""},
		"dhcpv6-for-victim-fragmented": {"sent", ""},
		"ndp-claim-victim":             {"sent", ""},
		"router-advertisement":         {"sent", ""},
		"sniff":                        {"refused", ""},
	}
	details := attackTable(t, bad, want)
	// The iSCSI bounds, as the attacker saw them: at most 16 writes (32
	// MiB) waiting for their data, and at most 8 connections held.
	if m := regexp.MustCompile(`: ([0-9]+) wait for their data, ([0-9]+) TASK SET FULL`).FindStringSubmatch(details["iscsi-pending-writes"]); assert.Check(t, m != nil, details["iscsi-pending-writes"]) {
		waiting, _ := strconv.Atoi(m[1])
		holds(t, rules.ISCSIMemory, waiting <= 16, "%d writes of 2 MiB wait for their data on one session", waiting)
	}
	if m := regexp.MustCompile(`([0-9]+) connections opened, ([0-9]+) closed`).FindStringSubmatch(details["iscsi-connections"]); assert.Check(t, m != nil, details["iscsi-connections"]) {
		opened, _ := strconv.Atoi(m[1])
		closed, _ := strconv.Atoi(m[2])
		holds(t, rules.ISCSIMemory, opened-closed <= 8, "%d of %d iSCSI connections held open", opened-closed, opened)
	}

	// The lab's records.
	var spoofed, refused []string
	for _, e := range lab.Timeline().Events("") {
		assert.Check(t, e.Kind != "panic", "the lab panicked: %s", e.Msg)
		switch {
		case e.Kind == "spoofed":
			spoofed = append(spoofed, e.Msg)
		case e.Kind == "refused":
			refused = append(refused, e.Msg)
		}
	}
	for _, r := range []struct{ rule, why string }{
		{rules.NDP, "a fragmented IPv6 datagram from attacker's port"},
		{rules.NDP, "a neighbor advertisement from attacker's port for " + linkLocalOf(t, victimMAC)},
		{rules.NDP, "naming link-layer address " + victimMAC},
		{rules.RouterMessages, "ICMPv6 type 134 (a router's) from attacker's port"},
	} {
		holds(t, r.rule, strings.Contains(strings.Join(spoofed, "\n"), r.why), "no frame recorded as spoofed for %q", r.why)
	}
	holds(t, rules.DHCPv6Identity, strings.Contains(strings.Join(refused, "\n"), "DHCPv6 SOLICIT from no known link-layer address"),
		"the Solicit from a link-local address of no MAC was not refused: %v", refused)
	holds(t, rules.PathOwner, strings.Contains(strings.Join(refused, "\n"), "which belongs to victim"), "no fetch of the victim's files recorded as refused")

	// The test's own oracles. No DHCP or DHCPv6 message of the attacker's
	// (by its transaction IDs) was taken for the victim's by the server.
	noDHCPForVictim(t, lab)
	for _, e := range lab.Timeline().Events("") {
		if x, _ := e.Detail["xid"].(string); e.Source == "dhcp" && e.MAC == victimMAC && (x == "0xbad6d0" || x == "0xbad6d1" || x == "0xbad6d2") {
			holds(t, rules.DHCPv6Identity, false, "the server took the attacker's DHCPv6 %s for the victim's: %s %s", x, e.Kind, e.Msg)
		}
	}
	// The victim's SAN CHAP secret, from the loader script its own port
	// delivered, is nowhere the attacker could see.
	raw, err := os.ReadFile(filepath.Join(victim.Dir, "network.pcapng"))
	assert.NilError(t, err)
	m := regexp.MustCompile(`set password ([0-9a-f]{8,})`).FindSubmatch(raw)
	assert.Assert(t, m != nil, "no SAN CHAP secret in the loader script the victim fetched")
	secret := m[1]
	holds(t, rules.PathOwner, !bytes.Contains([]byte(bad.Console()), secret), "the victim's SAN CHAP secret is on the attacker's console")
	raw, err = os.ReadFile(filepath.Join(bad.Dir, "network.pcapng"))
	assert.NilError(t, err)
	holds(t, rules.PathOwner, !bytes.Contains(raw, secret), "the victim's SAN CHAP secret crossed the attacker's port")
	checkCaptures(t, bad, victim, secret, false)
}

// holds checks one isolation rule: a failure names it (rule "" is a check
// no single rule of internal/rules stands for).
func holds(t *testing.T, rule string, ok bool, format string, args ...any) {
	t.Helper()
	if ok {
		return
	}
	if rule == "" {
		t.Errorf(format, args...)
		return
	}
	t.Errorf("rule %s broken: "+format, append([]any{rule}, args...)...)
}

// linkLocalOf is the EUI-64 link-local address of mac, worked out here.
func linkLocalOf(t *testing.T, mac string) string {
	m, err := net.ParseMAC(mac)
	assert.NilError(t, err)
	a := netip.AddrFrom16([16]byte{0: 0xfe, 1: 0x80, 8: m[0] ^ 2, 9: m[1], 10: m[2], 11: 0xff, 12: 0xfe, 13: m[3], 14: m[4], 15: m[5]})
	return a.String()
}

// tcp6From is the source port of a frame that carries TCP directly over
// IPv6, read by the test itself.
func tcp6From(f []byte) (uint16, bool) {
	if len(f) < 14+40+20 || f[12] != 0x86 || f[13] != 0xdd || f[20] != 6 {
		return 0, false
	}
	return uint16(f[54])<<8 | uint16(f[55]), true
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

// TestGuestMakesATrackedFileHuge: a guest makes a file its archive copies
// from its root 100 GiB and sparse in one step (a hole costs nothing of
// its NFS quota). At its next boot's fetch the keeper refuses the file by
// its size, unread, and says so on the timeline; the guest is served the
// archive it had, and the boot is judged on a stale archive (its init
// reads the file's size, not its bytes). The test process's peak memory is
// logged (make test runs this beside other tests, so it is not asserted).
func TestGuestMakesATrackedFileHuge(t *testing.T) {
	guestTest(t)
	if !selected("amd64", "seabios-ipxe") {
		t.Skip("amd64/seabios-ipxe not selected")
	}
	ctx := context.Background()
	lab := nbhtest.NewLab(t)
	g, err := lab.Boot(ctx, harness.Spec{Arch: "amd64", Firmware: "seabios-ipxe", Root: harness.RootNFS, Shell: true,
		Artifacts: nbhtest.Artifacts(t, "g1")})
	assert.NilError(t, err)
	v := g.Wait(ctx)
	assert.Assert(t, v.OK, "%v\n%s", v.Err(), strings.Join(v.Tail, "\n"))
	_, err = g.Expect(ctx, `nbh-root# $`)
	assert.NilError(t, err)
	out, status, err := g.Run(ctx, "truncate -s 100G /etc/nbh/boot.conf && sync && stat -c %s /etc/nbh/boot.conf")
	assert.NilError(t, err)
	assert.Equal(t, status, 0, out)
	assert.Equal(t, out, "107374182400\n")

	assert.NilError(t, g.Reboot(ctx))
	v = g.Wait(ctx)
	assert.Assert(t, !v.OK, "the boot passed on an archive its root no longer matches")
	assert.Equal(t, v.Reason, failure.StaleArchive, "%v", v.Err())
	var refused string
	for _, e := range g.Events() {
		if e.Source == "archive" && e.Kind == "error" {
			refused = e.Msg
		}
	}
	assert.Check(t, is.Contains(refused, "too large"))
	assert.Check(t, is.Contains(refused, "/etc/nbh/boot.conf"))
	t.Logf("verdict: %v; the keeper: %s", v.Err(), refused)
	if status, err := os.ReadFile("/proc/self/status"); err == nil {
		if m := regexp.MustCompile(`VmHWM:\s+(\d+) kB`).FindSubmatch(status); m != nil {
			t.Logf("the test process's peak resident memory: %s kB", m[1])
		}
	}
}
