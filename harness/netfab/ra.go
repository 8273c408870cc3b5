package netfab

import (
	"encoding/binary"
	"net"
	"time"
)

// ManagedV6 makes the router advertisements the port's guest gets say
// "managed" (the M flag): take an address from DHCPv6 (an IPv6 boot).
func (p *Port) ManagedV6(v bool) { p.managed6.Store(v) }

// routerAdvert answers an IPv6 router solicitation with an advertisement that
// offers an on-link prefix but none to autoconfigure, from the host as the
// default router (as DHCPv4's router option names it). EDK2's PXEv6 and
// HTTPv6 wait up to 10 s for a default route before their first TFTP or
// HTTP request; without one they sat out the wait.
// Boot loaders (iPXE waits ~13 s) stop waiting for IPv6 autoconfiguration as
// soon as a router answers (iPXE accepted it sent to all nodes with a prefix
// option; a bare unicast one was ignored). managed sets the M flag: iPXE and
// Linux then ask DHCPv6 for an address.
func routerAdvert(hostMAC net.HardwareAddr, managed bool) []byte {
	src := linkLocal(hostMAC)
	dst := net.ParseIP("ff02::1").To16()
	icmp := make([]byte, 16+8+32)
	icmp[0] = 134 // router advertisement
	icmp[4] = 64  // current hop limit
	// flags (M only), router lifetime; reachable time and retrans timer
	// unspecified.
	if managed {
		icmp[5] = 0x80
	}
	binary.BigEndian.PutUint16(icmp[6:], routerLifetime)
	icmp[16] = 1 // option: source link-layer address
	icmp[17] = 1 // length in units of 8 bytes
	copy(icmp[18:], hostMAC)
	// Prefix information: an on-link ULA prefix, not for autoconfiguration.
	pi := icmp[24:]
	pi[0], pi[1], pi[2] = 3, 4, 64
	pi[3] = 0x80 // on-link
	binary.BigEndian.PutUint32(pi[4:], 3600)
	binary.BigEndian.PutUint32(pi[8:], 3600)
	copy(pi[16:], []byte{0xfd, 0x4e, 0x42, 0x48})
	binary.BigEndian.PutUint16(icmp[2:], icmpv6Checksum(src, dst, icmp))

	f := make([]byte, 14+40+len(icmp))
	copy(f[0:6], []byte{0x33, 0x33, 0, 0, 0, 1})
	copy(f[6:12], hostMAC)
	binary.BigEndian.PutUint16(f[12:], 0x86dd)
	ip := f[14:]
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(icmp)))
	ip[6] = 58
	ip[7] = 255
	copy(ip[8:24], src)
	copy(ip[24:40], dst)
	copy(ip[40:], icmp)
	return f
}

// raInterval is how often the port's guest hears from its router unasked,
// once it boots over IPv6 (ManagedV6): radvd's shortest interval
// (MinRtrAdvInterval, RFC 4861). EDK2 forgets its default router at each
// change of its IPv6 policy (PXEv6 and HTTPv6 each make two) and, on Debian
// 12's OVMF, sent no new solicitation before its wait of up to 10 s for a
// default route ran out: an unasked advertisement ends that wait.
const raInterval = 3 * time.Second

// advertiseLoop sends the port's guest a router advertisement every
// raInterval while it boots over IPv6.
func (p *Port) advertiseLoop() {
	defer p.f.wg.Done()
	t := time.NewTicker(raInterval)
	defer t.Stop()
	for {
		select {
		case <-p.closed:
			return
		case <-t.C:
			if p.managed6.Load() {
				p.deliver(routerAdvert(p.f.HostMAC, true))
			}
		}
	}
}

// routerLifetime is how long, in seconds, a guest may keep the host as its
// default router.
const routerLifetime = 1800

// linkLocal is the EUI-64 link-local address of mac.
func linkLocal(mac net.HardwareAddr) net.IP {
	ip := make(net.IP, 16)
	ip[0], ip[1] = 0xfe, 0x80
	ip[8] = mac[0] ^ 2
	ip[9], ip[10] = mac[1], mac[2]
	ip[11], ip[12] = 0xff, 0xfe
	ip[13], ip[14], ip[15] = mac[3], mac[4], mac[5]
	return ip
}

func icmpv6Checksum(src, dst net.IP, msg []byte) uint16 {
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	add(src)
	add(dst)
	var ph [8]byte
	binary.BigEndian.PutUint32(ph[0:], uint32(len(msg)))
	ph[7] = 58
	add(ph[:])
	add(msg)
	for sum > 0xffff {
		sum = (sum >> 16) + (sum & 0xffff)
	}
	return ^uint16(sum)
}
