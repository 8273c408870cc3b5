package netfab

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// ListenTCP listens on port of both of the host's addresses, IPv4 and IPv6:
// one listener, so that a service keeps one table of clients whichever
// address a guest comes to.
func (f *Fabric) ListenTCP(port int) (net.Listener, error) {
	var lns []net.Listener
	for _, ip := range f.HostAddrs() {
		ln, err := f.ListenTCPAt(netip.AddrPortFrom(ip, uint16(port)))
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, err
		}
		lns = append(lns, ln)
	}
	return merge(lns), nil
}

// ListenUDP opens port on both of the host's addresses: one socket each.
func (f *Fabric) ListenUDP(port int) ([]net.PacketConn, error) {
	var pcs []net.PacketConn
	for _, ip := range f.HostAddrs() {
		pc, err := f.ListenUDPAt(netip.AddrPortFrom(ip, uint16(port)))
		if err != nil {
			for _, c := range pcs {
				c.Close()
			}
			return nil, err
		}
		pcs = append(pcs, pc)
	}
	return pcs, nil
}

// ListenTCPAt listens on one of the host's addresses alone: for a service
// that runs one server per address (HTTP boot) or is reached over IPv4 only
// (a forwarded port).
func (f *Fabric) ListenTCPAt(addr netip.AddrPort) (net.Listener, error) {
	a, proto := fullAddr(addr.Addr(), addr.Port())
	ln, err := gonet.ListenTCP(f.stack, a, proto)
	if err != nil {
		return nil, fmt.Errorf("netfab: listen tcp %s: %w", addr, err)
	}
	return ln, nil
}

// ListenUDPAt opens a server's well-known port on one of the host's
// addresses, for datagrams from any peer (TFTP's port 69: a server per
// address, so each knows the family it answers in).
func (f *Fabric) ListenUDPAt(addr netip.AddrPort) (net.PacketConn, error) {
	a, proto := fullAddr(addr.Addr(), addr.Port())
	pc, err := gonet.DialUDP(f.stack, &a, nil, proto)
	if err != nil {
		return nil, fmt.Errorf("netfab: listen udp %s: %w", addr, err)
	}
	return pc, nil
}

// DialUDP opens a socket from laddr, on a port the stack picks, that speaks
// with raddr alone: TFTP answers each request from a port of its own (the
// transfer ID of RFC 1350), so a stray or late datagram from another
// client never lands in a transfer. raddr must be of laddr's family (with
// an IPv4 laddr, an IPv4-mapped raddr is IPv4).
func (f *Fabric) DialUDP(laddr netip.Addr, raddr netip.AddrPort) (net.Conn, error) {
	la, proto := fullAddr(laddr, 0)
	r := raddr.Addr()
	if proto == ipv4.ProtocolNumber {
		r = r.Unmap()
	}
	if !r.IsValid() || r.Is4() != (proto == ipv4.ProtocolNumber) {
		return nil, fmt.Errorf("netfab: dial udp %s from %s: not the same IP family", raddr, laddr)
	}
	ra := tcpip.FullAddress{NIC: hostNIC, Addr: tcpip.AddrFrom16(r.As16()), Port: raddr.Port()}
	if r.Is4() {
		ra.Addr = tcpip.AddrFrom4(r.As4())
	}
	c, err := gonet.DialUDP(f.stack, &la, &ra, proto)
	if err != nil {
		return nil, fmt.Errorf("netfab: dial udp %s from %s: %w", raddr, laddr, err)
	}
	return c, nil
}

// ListenUDPBroadcast opens port on every IPv4 address of the host, limited
// broadcast included, with sending to broadcast allowed: DHCPv4, whose
// clients have no address to be answered at yet.
func (f *Fabric) ListenUDPBroadcast(port uint16) (net.PacketConn, error) {
	var wq waiter.Queue
	ep, terr := f.stack.NewEndpoint(udp.ProtocolNumber, ipv4.ProtocolNumber, &wq)
	if terr != nil {
		return nil, fmt.Errorf("netfab: udp endpoint: %s", terr)
	}
	ep.SocketOptions().SetBroadcast(true)
	if terr := ep.Bind(tcpip.FullAddress{Port: port}); terr != nil {
		ep.Close()
		return nil, fmt.Errorf("netfab: bind udp :%d: %s", port, terr)
	}
	return gonet.NewUDPConn(&wq, ep), nil
}

// ListenUDPGroup joins the host NIC to the IPv6 multicast group and opens
// port on that NIC, any of its addresses: DHCPv6, whose clients send to
// All_DHCP_Relay_Agents_and_Servers from their link-local address, so the
// socket is bound to the NIC for its replies to reach them. The group stays
// joined as long as the fabric.
func (f *Fabric) ListenUDPGroup(group netip.Addr, port uint16) (net.PacketConn, error) {
	if !group.Is6() || !group.IsMulticast() {
		return nil, fmt.Errorf("netfab: %s is not an IPv6 multicast group", group)
	}
	if err := f.stack.JoinGroup(ipv6.ProtocolNumber, hostNIC, tcpip.AddrFrom16(group.As16())); err != nil {
		return nil, fmt.Errorf("netfab: join %s: %s", group, err)
	}
	var wq waiter.Queue
	ep, terr := f.stack.NewEndpoint(udp.ProtocolNumber, ipv6.ProtocolNumber, &wq)
	if terr != nil {
		return nil, fmt.Errorf("netfab: udp endpoint: %s", terr)
	}
	if terr := ep.Bind(tcpip.FullAddress{NIC: hostNIC, Port: port}); terr != nil {
		ep.Close()
		return nil, fmt.Errorf("netfab: bind udp [::]:%d on the host NIC: %s", port, terr)
	}
	return gonet.NewUDPConn(&wq, ep), nil
}

// fullAddr is ip:port on the host NIC, with ip's network protocol (IPv4,
// or IPv6 for an IPv6 address that is not IPv4-mapped).
func fullAddr(ip netip.Addr, port uint16) (tcpip.FullAddress, tcpip.NetworkProtocolNumber) {
	ip = ip.Unmap()
	if ip.Is4() {
		return tcpip.FullAddress{NIC: hostNIC, Addr: tcpip.AddrFrom4(ip.As4()), Port: port}, ipv4.ProtocolNumber
	}
	return tcpip.FullAddress{NIC: hostNIC, Addr: tcpip.AddrFrom16(ip.As16()), Port: port}, ipv6.ProtocolNumber
}

// HostAddrs is the host's addresses on the segment, IPv4 then IPv6: where
// the boot services listen.
func (f *Fabric) HostAddrs() []netip.Addr { return []netip.Addr{f.HostIP, f.HostIP6} }

// merged is one listener over several: Accept returns the next connection
// any of them accepts.
type merged struct {
	lns   []net.Listener
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
	wg    sync.WaitGroup
}

func merge(lns []net.Listener) *merged {
	m := &merged{lns: lns, conns: make(chan net.Conn), done: make(chan struct{})}
	for _, ln := range lns {
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				select {
				case m.conns <- c:
				case <-m.done:
					c.Close()
					return
				}
			}
		}()
	}
	return m
}

func (m *merged) Accept() (net.Conn, error) {
	select {
	case c := <-m.conns:
		return c, nil
	case <-m.done:
		return nil, net.ErrClosed
	}
}

// Close stops all of the listeners; connections accepted stay open.
func (m *merged) Close() error {
	var errs []error
	m.once.Do(func() {
		close(m.done)
		for _, ln := range m.lns {
			errs = append(errs, ln.Close())
		}
		m.wg.Wait()
	})
	return errors.Join(errs...)
}

// Addr is the first (IPv4) listener's address.
func (m *merged) Addr() net.Addr { return m.lns[0].Addr() }
