package ipsec

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

// tcpPacket is an IPv4 TCP packet from 10.0.2.15:40000 to 10.0.2.2:dport.
func tcpPacket(dport uint16, payload []byte) []byte {
	p := make([]byte, 20+20+len(payload))
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	p[8], p[9] = 64, ProtoTCP
	copy(p[12:], []byte{10, 0, 2, 15})
	copy(p[16:], []byte{10, 0, 2, 2})
	binary.BigEndian.PutUint16(p[20:], 40000)
	binary.BigEndian.PutUint16(p[22:], dport)
	copy(p[40:], payload)
	fixHeader(p, 20)
	return p
}

func checksumOK(p []byte) bool {
	var sum uint32
	for i := 0; i < int(p[0]&0xf)*4; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(p[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return sum == 0xffff
}

// TestTransportMode: Encap hides the TCP header and data, keeps the IP
// header valid, and Decap restores the packet exactly.
func TestTransportMode(t *testing.T) {
	out, in := pair(t, 32)
	secret := []byte("NFS READ reply: root file system contents")
	pkt := tcpPacket(2049, secret)
	esp, err := Encap(out, pkt)
	if err != nil {
		t.Fatal(err)
	}
	if esp[9] != ProtoESP || !checksumOK(esp) || int(binary.BigEndian.Uint16(esp[2:])) != len(esp) {
		t.Fatalf("bad outer header %x", esp[:20])
	}
	if bytes.Contains(esp, secret) {
		t.Fatal("the payload is visible in the ESP packet")
	}
	if proto, _, _, _ := Ports(esp); proto != ProtoESP {
		t.Fatalf("Ports of ESP: proto %d", proto)
	}
	back, err := Decap(in, esp)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, pkt) {
		t.Fatalf("decap:\n got %x\nwant %x", back, pkt)
	}
	frag := tcpPacket(2049, secret)
	frag[6] = 0x20 // more fragments
	if _, err := Encap(out, frag); !errors.Is(err, ErrFragment) {
		t.Fatalf("fragment: %v", err)
	}
	if _, err := Decap(in, pkt); err == nil {
		t.Fatal("decapsulated a clear packet")
	}
}

// TestRequiredPolicy: the root's services are protect-only, the boot path
// is clear, the rest is dropped; counters follow.
func TestRequiredPolicy(t *testing.T) {
	p := Required()
	// By the host's port: the destination of what a guest sends, the
	// source of the host's reply.
	cases := []struct {
		proto    uint8
		hostPort uint16
		want     Action
	}{
		{ProtoTCP, 2049, Protect},
		{ProtoTCP, 3260, Protect},
		{ProtoUDP, 111, Protect},
		{ProtoUDP, 67, Bypass},
		{ProtoUDP, 69, Bypass},
		{ProtoUDP, 50123, Bypass}, // a TFTP transfer port
		{ProtoTCP, 80, Bypass},
		{ProtoICMP, 0, Bypass},
		{ProtoTCP, 22, Discard},
		// A guest that sends from port 80 or 2049 to the host's port 22
		// is judged by 22.
		{ProtoTCP, 22, Discard},
	}
	for _, c := range cases {
		if got, _ := p.Decide(c.proto, c.hostPort); got != c.want {
			t.Errorf("%d port %d: %v, want %v", c.proto, c.hostPort, got, c.want)
		}
	}
	_, i := p.Decide(ProtoTCP, 2049)
	p.Dropped(i)
	cs := p.Counters()
	if cs[2].Rule != "tcp/2049 protect" || cs[2].Packets != 2 || cs[2].Dropped != 1 {
		t.Fatalf("counters %+v", cs[2])
	}
	if last := cs[len(cs)-1]; last.Rule != "default discard" || last.Packets != 2 {
		t.Fatalf("default counters %+v", last)
	}
}

// tcpChecksum computes a TCP segment's checksum over the IPv4 pseudo-header.
func tcpChecksum(pkt []byte) uint16 {
	ihl := int(pkt[0]&0x0f) * 4
	seg := append([]byte(nil), pkt[ihl:]...)
	seg[16], seg[17] = 0, 0
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	add(pkt[12:20])
	sum += ProtoTCP + uint32(len(seg))
	add(seg)
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

func synWith(opts []byte) []byte {
	tcp := make([]byte, 20+len(opts))
	binary.BigEndian.PutUint16(tcp[0:], 40000)
	binary.BigEndian.PutUint16(tcp[2:], 2049)
	tcp[12] = byte((20+len(opts))/4) << 4
	tcp[13] = 0x02
	copy(tcp[20:], opts)
	pkt := append([]byte{0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, ProtoTCP, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2}, tcp...)
	fixHeader(pkt, 20)
	binary.BigEndian.PutUint16(pkt[20+16:], tcpChecksum(pkt))
	return pkt
}

// TestClampMSS lowers the MSS option wherever it sits (aligned or not) and
// leaves a correct checksum; small MSS values and non-SYNs are untouched.
func TestClampMSS(t *testing.T) {
	for _, c := range []struct {
		name string
		opts []byte
		at   int
	}{
		{"aligned", []byte{2, 4, 0x05, 0xb4, 1, 1, 4, 2}, 2},
		{"after-one-nop", []byte{1, 2, 4, 0x05, 0xb4, 1, 1, 0}, 3},
		{"after-sack-permitted", []byte{4, 2, 2, 4, 0x05, 0xb4, 0, 0}, 4},
	} {
		t.Run(c.name, func(t *testing.T) {
			pkt := synWith(c.opts)
			if !ClampMSS(pkt, 1423) {
				t.Fatal("not clamped")
			}
			if got := binary.BigEndian.Uint16(pkt[40+c.at:]); got != 1423 {
				t.Fatalf("MSS %d, want 1423", got)
			}
			if got, want := binary.BigEndian.Uint16(pkt[36:]), tcpChecksum(pkt); got != want {
				t.Fatalf("checksum %#x, want %#x", got, want)
			}
			if ClampMSS(pkt, 1460) {
				t.Fatal("raised an MSS")
			}
		})
	}
	ack := synWith([]byte{2, 4, 0x05, 0xb4})
	ack[33] = 0x10
	if ClampMSS(ack, 1000) {
		t.Fatal("clamped a segment that is not a SYN")
	}
	for _, bad := range [][]byte{{2, 9, 0, 0}, {2}, {3, 0, 0, 0}} {
		pkt := synWith(append(bad, make([]byte, (4-len(bad)%4)%4)...))
		ClampMSS(pkt, 1000) // must not panic
	}
}

// A SYN whose IP total length is shorter than its headers (a lying guest)
// is left alone, without harm.
func TestClampMSSRefusesShortTotalLength(t *testing.T) {
	for _, total := range []int{20, 21, 32, 39} {
		pkt := synWith([]byte{2, 4, 0x05, 0xb4})
		binary.BigEndian.PutUint16(pkt[2:], uint16(total))
		before := append([]byte(nil), pkt...)
		if ClampMSS(pkt, 1000) {
			t.Fatalf("total length %d: clamped", total)
		}
		if !bytes.Equal(pkt, before) {
			t.Fatalf("total length %d: the packet changed", total)
		}
	}
}
