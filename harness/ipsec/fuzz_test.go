package ipsec

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// tcpChecksumOK checks a TCP segment's checksum (the segment being what
// the IP total length says).
func tcpChecksumOK(pkt []byte) bool {
	ihl := int(pkt[0]&0x0f) * 4
	seg := pkt[:binary.BigEndian.Uint16(pkt[2:])]
	return binary.BigEndian.Uint16(seg[ihl+16:]) == tcpChecksum(seg)
}

// synWithMSS is a SYN to port 2049 whose options (after pad no-ops) offer
// mss.
func synWithMSS(pad int, mss uint16) []byte {
	opts := append(bytes.Repeat([]byte{1}, pad), 2, 4, byte(mss>>8), byte(mss))
	for len(opts)%4 != 0 {
		opts = append(opts, 0)
	}
	return synWith(opts)
}

// FuzzClampMSS: whatever the packet, ClampMSS keeps its length, changes
// nothing but the MSS value and the TCP checksum, leaves an MSS no larger
// than its limit when it says it clamped, and keeps a good checksum good.
func FuzzClampMSS(f *testing.F) {
	for pad := range 4 {
		f.Add(synWithMSS(pad, 1460), uint16(1360))
	}
	f.Add(synWithMSS(0, 1200), uint16(1360))
	f.Add([]byte{0x45, 0, 0, 20, 0, 0, 0, 0, 64, 6, 0, 0}, uint16(1))
	f.Fuzz(func(t *testing.T, pkt []byte, max uint16) {
		orig := bytes.Clone(pkt)
		_, perr := ipv4(pkt)
		goodSum := perr == nil && pkt[9] == ProtoTCP &&
			int(binary.BigEndian.Uint16(pkt[2:])) >= int(pkt[0]&0x0f)*4+20 && tcpChecksumOK(pkt)
		changed := ClampMSS(pkt, max)
		if len(pkt) != len(orig) {
			t.Fatal("the length changed")
		}
		if !changed {
			if !bytes.Equal(pkt, orig) {
				t.Fatal("changed the packet and said it did not")
			}
			return
		}
		var diff []int
		for i := range pkt {
			if pkt[i] != orig[i] {
				diff = append(diff, i)
			}
		}
		ihl := int(pkt[0]&0x0f) * 4
		for _, i := range diff {
			if i == ihl+16 || i == ihl+17 {
				continue // the checksum
			}
			// Otherwise the byte is one of an MSS option's two value bytes.
			first := i >= 2 && pkt[i-2] == 2 && pkt[i-1] == 4
			second := i >= 3 && pkt[i-3] == 2 && pkt[i-2] == 4
			if !first && !second {
				t.Fatalf("changed byte %d, outside the MSS option and the checksum", i)
			}
			at := i
			if second {
				at = i - 1
			}
			if binary.BigEndian.Uint16(pkt[at:]) > max {
				t.Fatalf("clamped to %d, above %d", binary.BigEndian.Uint16(pkt[at:]), max)
			}
		}
		if goodSum && !tcpChecksumOK(pkt) {
			t.Fatal("broke a good TCP checksum")
		}
	})
}

// FuzzGateway runs a hostile guest against the gateway in both directions.
// The input is a list of operations: a raw packet from the guest, a packet
// the guest seals with its real SA (so a valid one exists to forge from),
// a replay or a bit-flipped copy of an earlier ESP packet, and a packet the
// host sends. It holds that
//   - ESP opens only what the guest sealed, and each ESP packet at most once;
//   - nothing reaches the host that the policy table discards, and nothing
//     in clear that it requires ESP for;
//   - what the host sends goes in clear only where the table says bypass,
//     and otherwise as ESP the guest opens to the same packet;
//   - every SYN that passes offers no more than the gateway's MSS.
func FuzzGateway(f *testing.F) {
	f.Add([]byte{1, 44, 0}) // seal a SYN, deliver it, replay it
	f.Add([]byte{0, 0, 3, 0})
	f.Add([]byte{3, 1, 4, 7})
	f.Fuzz(func(t *testing.T, ops []byte) {
		gw, guest, _ := newPeers(t)
		gw.MSS = 1360
		table := Required() // the oracle: same rules, its own counters
		var sealed [][]byte // inner packets the guest sealed
		var esps [][]byte   // ESP packets it sent
		opened := map[string]bool{}
		next := func() int {
			if len(ops) == 0 {
				return 0
			}
			b := ops[0]
			ops = ops[1:]
			return int(b)
		}
		body := func() []byte {
			n := min(next(), len(ops))
			b := ops[:n]
			ops = ops[n:]
			return b
		}
		packet := func() []byte {
			// A TCP or UDP packet to one of the policy's ports (or any),
			// with fuzzed header bytes and payload.
			ports := []uint16{22, 80, 111, 2049, 3260, 67, 69, 5000}
			p := tcpPacket(ports[next()%len(ports)], nil)
			if next()%2 == 1 {
				p[9] = ProtoUDP
			}
			if next()%2 == 1 {
				p = synWithMSS(next()%4, uint16(next())<<8|uint16(next()))
			}
			hdr := body()
			copy(p[20:min(len(p), 20+len(hdr))], hdr)
			p = append(p, body()...)
			binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
			fixHeader(p, 20)
			return p
		}
		checkIn := func(out []byte, viaESP bool) {
			if out == nil {
				return
			}
			proto, _, dport, err := Ports(out)
			if err != nil {
				t.Fatalf("passed a packet it cannot read: %x", out)
			}
			a, _ := table.Decide(proto, dport)
			if a == Discard || a == Protect && !viaESP {
				t.Fatalf("passed %s/%d (%s) to the host (ESP: %v)", ProtoName(proto), dport, a, viaESP)
			}
			if ihl := int(out[0]&0x0f) * 4; proto == ProtoTCP && len(out) >= ihl+20 && out[ihl+13]&0x02 != 0 {
				if mss, ok := mssOf(out); ok && mss > gw.MSS {
					t.Fatalf("a SYN passed offering MSS %d", mss)
				}
			}
		}
		for steps := 0; len(ops) > 0 && steps < 24; steps++ {
			switch next() % 5 {
			case 0: // a raw packet from the guest
				raw := body()
				if len(raw) >= 20 && raw[9] == ProtoESP {
					if out := gw.Inbound(bytes.Clone(raw)); out != nil {
						t.Fatalf("a raw ESP packet opened: %x", raw)
					}
					continue
				}
				checkIn(gw.Inbound(bytes.Clone(raw)), false)
			case 1: // the guest seals a packet and sends it
				p := packet()
				e, err := Encap(guest.out, p)
				if err != nil {
					continue
				}
				sealed = append(sealed, p)
				esps = append(esps, e)
				fallthrough
			case 2: // an earlier ESP packet again, as it was or changed
				if len(esps) == 0 {
					continue
				}
				e := bytes.Clone(esps[next()%len(esps)])
				if flip := next(); flip%3 == 0 {
					e[20+flip%(len(e)-20)] ^= byte(next() | 1)
				}
				out := gw.Inbound(bytes.Clone(e))
				if out == nil {
					continue
				}
				if opened[string(e)] {
					t.Fatal("the same ESP packet opened twice (a replay)")
				}
				opened[string(e)] = true
				known := false
				for _, s := range sealed {
					c := bytes.Clone(s)
					ClampMSS(c, gw.MSS)
					known = known || bytes.Equal(c, out)
				}
				if !known {
					t.Fatalf("ESP opened to a packet the guest never sealed: %x", out)
				}
				checkIn(out, true)
			case 3: // the host answers
				p := packet()
				copy(p[12:20], []byte{10, 0, 2, 2, 10, 0, 2, 15})
				p[20], p[21], p[22], p[23] = p[22], p[23], p[20], p[21]
				fixHeader(p, 20)
				proto, sport, _, _ := Ports(p)
				want := bytes.Clone(p)
				ClampMSS(want, gw.MSS)
				out := gw.Outbound(bytes.Clone(p))
				a, _ := table.Decide(proto, sport)
				switch {
				case out == nil:
				case a == Bypass:
					if !bytes.Equal(out, p) {
						t.Fatal("a bypassed packet was changed")
					}
				case a == Discard:
					t.Fatalf("sent %s from port %d, which the table discards", ProtoName(proto), sport)
				default:
					inner, err := Decap(guest.in, out)
					if err != nil || !bytes.Equal(inner, want) {
						t.Fatalf("a protected packet the guest cannot open to what the host sent: %v", err)
					}
				}
			case 4: // any bytes as a packet from the host's side
				gw.Outbound(body())
			}
		}
	})
}

// mssOf reads the MSS option of a TCP SYN.
func mssOf(pkt []byte) (uint16, bool) {
	ihl := int(pkt[0]&0x0f) * 4
	tcp := pkt[ihl:]
	if len(tcp) < 20 {
		return 0, false
	}
	off := int(tcp[12]>>4) * 4
	if off < 20 || off > len(tcp) {
		return 0, false
	}
	opts := tcp[20:off]
	for i := 0; i < len(opts); {
		switch opts[i] {
		case 0:
			return 0, false
		case 1:
			i++
			continue
		}
		if i+1 >= len(opts) || opts[i+1] < 2 || i+int(opts[i+1]) > len(opts) {
			return 0, false
		}
		if opts[i] == 2 && opts[i+1] == 4 {
			return binary.BigEndian.Uint16(opts[i+2:]), true
		}
		i += int(opts[i+1])
	}
	return 0, false
}
