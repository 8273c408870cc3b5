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
	l4        int // offset of the transport header, 0 if none
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
		// Only the first fragment carries ports.
		if binary.BigEndian.Uint16(f[20:22])&0x1fff != 0 {
			return fi, true
		}
		fi.l4 = 14 + ihl
	case 0x86dd:
		if len(f) < 54 {
			return fi, true
		}
		fi.proto = f[20]
		fi.l4 = 54
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
