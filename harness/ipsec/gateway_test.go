package ipsec

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"strings"
	"testing"
)

// guestSide is what a guest's kernel would do: its own SAs, mirrored.
type guestSide struct{ out, in *SA }

func newPeers(t *testing.T) (*Gateway, guestSide, *[]string) {
	km1 := bytes.Repeat([]byte{1}, 36)
	km2 := bytes.Repeat([]byte{2}, 36)
	gIn, _ := NewSA(0x100, km1)  // gateway: guest -> host
	gOut, _ := NewSA(0x200, km2) // gateway: host -> guest
	guestOut, _ := NewSA(0x100, km1)
	guestIn, _ := NewSA(0x200, km2)
	gw := NewGateway(Required())
	var reports []string
	gw.Report = func(kind string, addr netip.Addr, n uint64, msg string) { reports = append(reports, kind+": "+msg) }
	gw.AddPeer(&Peer{Addr: netip.MustParseAddr("10.0.2.15"), In: gIn, Out: gOut})
	return gw, guestSide{out: guestOut, in: guestIn}, &reports
}

// reply turns a guest->host TCP packet into the host's answer.
func reply(p []byte) []byte {
	r := append([]byte(nil), p...)
	copy(r[12:16], p[16:20])
	copy(r[16:20], p[12:16])
	binary.BigEndian.PutUint16(r[20:], binary.BigEndian.Uint16(p[22:]))
	binary.BigEndian.PutUint16(r[22:], binary.BigEndian.Uint16(p[20:]))
	fixHeader(r, 20)
	return r
}

// A guest cannot pass the policy by choosing its source port: from port 80
// (HTTP bypasses) or 67 to the host's port 22, it is dropped; a fragment,
// whose ports cannot be read, is dropped too.
func TestGatewayJudgesByTheHostPort(t *testing.T) {
	gw, _, reports := newPeers(t)
	for _, sport := range []uint16{80, 67, 2049} {
		p := tcpPacket(22, []byte("ssh"))
		binary.BigEndian.PutUint16(p[20:], sport)
		if gw.Inbound(p) != nil {
			t.Fatalf("from port %d to port 22: passed", sport)
		}
	}
	frag := tcpPacket(80, []byte("GET"))
	binary.BigEndian.PutUint16(frag[6:], 0x2000) // more fragments
	fixHeader(frag, 20)
	if gw.Inbound(frag) != nil {
		t.Fatal("a fragment passed")
	}
	if gw.Inbound(tcpPacket(80, []byte("GET"))) == nil {
		t.Fatal("HTTP to port 80 dropped")
	}
	got := strings.Join(*reports, "\n")
	if !strings.Contains(got, "policy-drop: tcp 80->22") || !strings.Contains(got, "fragment: ") {
		t.Fatalf("reports:\n%s", got)
	}
}

// TestGatewayProtectsTheRoot: NFS under ESP flows both ways; clear NFS is
// dropped and reported; HTTP passes in clear; a wrong key and a replay are
// refused with their own reports.
func TestGatewayProtectsTheRoot(t *testing.T) {
	gw, guest, reports := newPeers(t)
	nfs := tcpPacket(2049, []byte("READ"))

	esp, err := Encap(guest.out, nfs)
	if err != nil {
		t.Fatal(err)
	}
	in := gw.Inbound(esp)
	if !bytes.Equal(in, nfs) {
		t.Fatalf("inbound ESP: got %x", in)
	}
	out := gw.Outbound(reply(nfs))
	if out == nil || out[9] != ProtoESP {
		t.Fatalf("the NFS reply left unprotected: %x", out)
	}
	back, err := Decap(guest.in, out)
	if err != nil || !bytes.Equal(back, reply(nfs)) {
		t.Fatalf("the guest cannot open the reply: %v", err)
	}

	if gw.Inbound(nfs) != nil {
		t.Fatal("clear NFS from the guest reached the host")
	}
	http := tcpPacket(80, []byte("GET /g1/vmlinuz"))
	if !bytes.Equal(gw.Inbound(http), http) || !bytes.Equal(gw.Outbound(reply(http)), reply(http)) {
		t.Fatal("the boot-file HTTP server was not reachable in clear")
	}
	if gw.Inbound(esp) != nil {
		t.Fatal("a replayed ESP packet was accepted")
	}
	wrong, _ := NewSA(0x100, bytes.Repeat([]byte{9}, 36))
	for range 4 {
		wrong.Seal(nil, 6, nil) // a sequence number the gateway has not seen
	}
	bad, _ := Encap(wrong, nfs)
	if gw.Inbound(bad) != nil {
		t.Fatal("ESP under a wrong key was accepted")
	}
	otherSPI, _ := NewSA(0x999, bytes.Repeat([]byte{1}, 36))
	bad, _ = Encap(otherSPI, nfs)
	if gw.Inbound(bad) != nil {
		t.Fatal("ESP with an unknown SPI was accepted")
	}
	all := strings.Join(*reports, "\n")
	for _, want := range []string{"esp-required: clear tcp 40000->2049", "esp-replay", "esp-auth", "esp-unknown-spi"} {
		if !strings.Contains(all, want) {
			t.Errorf("no %q report in:\n%s", want, all)
		}
	}
	if c := gw.Peer(netip.MustParseAddr("10.0.2.15")).In.Counters(); c.Replays != 1 || c.AuthFailures != 1 || c.Packets != 1 {
		t.Errorf("SA counters %+v", c)
	}

	// A guest without SAs gets no protected traffic at all.
	stranger := tcpPacket(2049, []byte("x"))
	copy(stranger[12:16], []byte{10, 0, 2, 99})
	fixHeader(stranger, 20)
	if gw.Outbound(reply(stranger)) != nil {
		t.Fatal("protected traffic left for a guest without an SA")
	}
}

// TestGatewayClampsMSS: a protected SYN is clamped both ways (the guest's
// opened one and the host's before sealing); a clear HTTP SYN is not.
func TestGatewayClampsMSS(t *testing.T) {
	gw, guest, _ := newPeers(t)
	gw.MSS = MaxMSS(1500)
	syn := synWith([]byte{2, 4, 0x05, 0xb4}) // 40000 -> 2049, MSS 1460
	esp, err := Encap(guest.out, syn)
	if err != nil {
		t.Fatal(err)
	}
	in := gw.Inbound(esp)
	if got := binary.BigEndian.Uint16(in[42:]); got != MaxMSS(1500) {
		t.Fatalf("inbound SYN MSS %d, want %d", got, MaxMSS(1500))
	}
	if tcpChecksum(in) != binary.BigEndian.Uint16(in[36:]) {
		t.Fatal("bad checksum after clamping")
	}
	out := gw.Outbound(reply(synWith([]byte{2, 4, 0x05, 0xb4})))
	back, err := Decap(guest.in, out)
	if err != nil {
		t.Fatal(err)
	}
	if got := binary.BigEndian.Uint16(back[42:]); got != MaxMSS(1500) {
		t.Fatalf("outbound SYN MSS %d", got)
	}
	http := synWith([]byte{2, 4, 0x05, 0xb4})
	binary.BigEndian.PutUint16(http[22:], 80)
	if got := gw.Inbound(http); binary.BigEndian.Uint16(got[42:]) != 1460 {
		t.Fatal("a clear SYN was clamped")
	}
	if len(out) > 20+20+4+Overhead {
		t.Fatalf("ESP of a bare SYN is %d bytes", len(out))
	}
}
