package netfab

import (
	"encoding/binary"
	"net"
)

// frameInfo is what fault rules and the RA responder look at in a frame.
type frameInfo struct {
	dst, src  net.HardwareAddr
	etherType uint16
	proto     uint8 // IP protocol (6 tcp, 17 udp, 58 icmpv6)
	srcPort   uint16
	dstPort   uint16
	icmpType  uint8
	l4        int  // offset of the transport header, 0 if none
	fragment  bool // a fragment of an IP datagram (IPv4's MF or offset, IPv6's Fragment header)
	fragOff   int  // its offset in the datagram, in bytes
}

func parseFrame(f []byte) (fi frameInfo, ok bool) {
	if len(f) < 14 {
		return fi, false
	}
	fi.dst, fi.src = net.HardwareAddr(f[0:6]), net.HardwareAddr(f[6:12])
	fi.etherType = binary.BigEndian.Uint16(f[12:14])
	switch fi.etherType {
	case 0x0800:
		if len(f) < 34 {
			return fi, true
		}
		ihl := int(f[14]&0x0f) * 4
		if ihl < 20 || len(f) < 14+ihl {
			return fi, true
		}
		fi.proto = f[23]
		flags := binary.BigEndian.Uint16(f[20:22])
		fi.fragOff = int(flags&0x1fff) * 8
		fi.fragment = flags&0x2000 != 0 || fi.fragOff != 0
		// Only the first fragment carries ports.
		if fi.fragOff != 0 {
			return fi, true
		}
		fi.l4 = 14 + ihl
	case 0x86dd:
		if len(f) < 54 {
			return fi, true
		}
		// The upper layer, past the extension headers a host sends
		// before it (hop-by-hop options carry MLD's router alert).
		next, off := f[20], 54
		for {
			if next == 44 { // Fragment
				if len(f) < off+8 {
					return fi, true
				}
				fi.fragment = true
				fi.fragOff = int(binary.BigEndian.Uint16(f[off+2:]) &^ 7)
				next, off = f[off], off+8
				if fi.fragOff != 0 {
					fi.proto = next
					return fi, true
				}
				continue
			}
			if next != 0 && next != 43 && next != 60 { // hop-by-hop, routing, destination options
				break
			}
			if len(f) < off+8 {
				return fi, true
			}
			next, off = f[off], off+(int(f[off+1])+1)*8
		}
		if off > len(f) {
			// An extension header longer than the frame: no upper layer
			// to read (proto 0, which no port may send).
			return fi, true
		}
		fi.proto = next
		fi.l4 = off
	default:
		return fi, true
	}
	switch fi.proto {
	case 6, 17:
		if len(f) >= fi.l4+4 {
			fi.srcPort = binary.BigEndian.Uint16(f[fi.l4:])
			fi.dstPort = binary.BigEndian.Uint16(f[fi.l4+2:])
		}
	case 58:
		if len(f) > fi.l4 {
			fi.icmpType = f[fi.l4]
		}
	}
	return fi, true
}

func isGroup(mac net.HardwareAddr) bool { return len(mac) > 0 && mac[0]&1 == 1 }

// sameBytes says whether a and b are the same slice (a filter that passed
// a frame unchanged returns it as it was).
func sameBytes(a, b []byte) bool { return len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0]) }
