package ipsec

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// ErrFragment is returned for IPv4 fragments: transport-mode ESP protects
// whole datagrams, so fragments must be reassembled first (or, outbound,
// never made: the lab's host MTU leaves room for ESP).
var ErrFragment = errors.New("esp: IPv4 fragment")

// ipv4 checks an IPv4 header and returns its length.
func ipv4(pkt []byte) (int, error) {
	if len(pkt) < 20 || pkt[0]>>4 != 4 {
		return 0, errors.New("esp: not an IPv4 packet")
	}
	ihl := int(pkt[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(pkt[2:]))
	if ihl < 20 || total < ihl || total > len(pkt) {
		return 0, fmt.Errorf("esp: bad IPv4 header (ihl %d, total %d, have %d)", ihl, total, len(pkt))
	}
	if frag := binary.BigEndian.Uint16(pkt[6:]); frag&0x3fff != 0 {
		return 0, ErrFragment
	}
	return ihl, nil
}

// Ports returns an IPv4 packet's protocol and, for TCP and UDP, its ports
// (zero otherwise, or when the header is cut short).
func Ports(pkt []byte) (proto uint8, src, dst uint16, err error) {
	ihl, err := ipv4(pkt)
	if err != nil && !errors.Is(err, ErrFragment) {
		return 0, 0, 0, err
	}
	proto = pkt[9]
	if err == nil && (proto == ProtoTCP || proto == ProtoUDP) && len(pkt) >= ihl+4 {
		src = binary.BigEndian.Uint16(pkt[ihl:])
		dst = binary.BigEndian.Uint16(pkt[ihl+2:])
	}
	return proto, src, dst, nil
}

// Encap protects an IPv4 packet's payload with ESP in transport mode: the
// header stays (protocol 50, new length and checksum), the payload and its
// protocol number go inside ESP.
func Encap(sa *SA, pkt []byte) ([]byte, error) {
	ihl, err := ipv4(pkt)
	if err != nil {
		return nil, err
	}
	total := int(binary.BigEndian.Uint16(pkt[2:]))
	out := make([]byte, ihl, total+Overhead)
	copy(out, pkt[:ihl])
	out, err = sa.Seal(out, pkt[9], pkt[ihl:total])
	if err != nil {
		return nil, err
	}
	out[9] = ProtoESP
	fixHeader(out, ihl)
	return out, nil
}

// Decap opens an ESP-protected IPv4 packet (transport mode) and returns the
// packet as it was before Encap.
func Decap(sa *SA, pkt []byte) ([]byte, error) {
	ihl, err := ipv4(pkt)
	if err != nil {
		return nil, err
	}
	if pkt[9] != ProtoESP {
		return nil, fmt.Errorf("esp: protocol %d is not ESP", pkt[9])
	}
	total := int(binary.BigEndian.Uint16(pkt[2:]))
	nh, payload, err := sa.Open(pkt[ihl:total])
	if err != nil {
		return nil, err
	}
	out := make([]byte, ihl, ihl+len(payload))
	copy(out, pkt[:ihl])
	out = append(out, payload...)
	out[9] = nh
	fixHeader(out, ihl)
	return out, nil
}

// fixHeader sets an IPv4 header's total length and checksum.
func fixHeader(pkt []byte, ihl int) {
	binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
	pkt[10], pkt[11] = 0, 0
	var sum uint32
	for i := 0; i < ihl; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(pkt[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	binary.BigEndian.PutUint16(pkt[10:], ^uint16(sum))
}

// ClampMSS lowers the maximum segment size a TCP SYN offers to max, fixing
// the TCP checksum, and reports whether it changed the packet. ESP makes
// every protected packet longer; a peer that offers the MSS of a clear
// 1500-byte path (Linux offers its device's, not its ESP path's) would get
// segments whose ESP packets no longer fit, so a gateway clamps the SYNs it
// passes, as a router does for a tunnel.
func ClampMSS(pkt []byte, max uint16) bool {
	ihl, err := ipv4(pkt)
	if err != nil || pkt[9] != ProtoTCP || len(pkt) < ihl+20 {
		return false
	}
	// The TCP header by the IP total length, which a lying packet may set
	// shorter than the headers it carries.
	tcp := pkt[ihl:int(binary.BigEndian.Uint16(pkt[2:]))]
	if len(tcp) < 20 || tcp[13]&0x02 == 0 { // cut short, or not a SYN
		return false
	}
	off := int(tcp[12]>>4) * 4
	if off < 20 || off > len(tcp) {
		return false
	}
	opts := tcp[20:off]
	for i := 0; i < len(opts); {
		switch opts[i] {
		case 0: // end of options
			return false
		case 1: // no-op
			i++
			continue
		}
		if i+1 >= len(opts) || opts[i+1] < 2 || i+int(opts[i+1]) > len(opts) {
			return false
		}
		if opts[i] == 2 && opts[i+1] == 4 {
			old := binary.BigEndian.Uint16(opts[i+2:])
			if old <= max {
				return false
			}
			binary.BigEndian.PutUint16(opts[i+2:], max)
			// RFC 1624: HC' = ~(~HC + ~m + m'). Options before the MSS
			// need not keep it 16-bit aligned; at an odd offset its
			// bytes fall in the other lanes of the sum.
			sum := uint32(^binary.BigEndian.Uint16(tcp[16:]))
			even := (20+i+2)%2 == 0
			sum += lane(^old, even) + lane(max, even)
			for sum > 0xffff {
				sum = sum>>16 + sum&0xffff
			}
			binary.BigEndian.PutUint16(tcp[16:], ^uint16(sum))
			return true
		}
		i += int(opts[i+1])
	}
	return false
}

// lane places a 16-bit word at an even or odd byte offset of the
// one's-complement sum (an odd offset swaps its bytes).
func lane(v uint16, even bool) uint32 {
	if even {
		return uint32(v)
	}
	return uint32(v>>8 | v<<8)
}

// MaxMSS is the largest TCP segment whose ESP-protected IPv4 packet fits an
// MTU: IPv4 and TCP headers, then ESP's worst case.
func MaxMSS(mtu int) uint16 { return uint16(mtu - 20 - 20 - Overhead) }
