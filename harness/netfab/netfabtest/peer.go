// Package netfabtest is test support for the fabric's users: a Peer, an
// in-process guest whose gVisor stack the tests dial from. It is for tests
// alone, so it may show gVisor in its API; netfab itself does not.
package netfabtest

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net/netip"
	"os"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"nbh.dev/nbh/harness/netfab"
)

// Peer is an in-process stand-in for a guest: a gVisor stack plugged into a
// port through the same stream socket QEMU would use. Unit tests of the
// services use it as their client; scenarios use real guests.
type Peer struct {
	Stack *stack.Stack
	ep    *channel.Endpoint
	f     *os.File
	ctx   context.Context
	stop  context.CancelFunc
	done  chan struct{}
}

// NewPeer attaches a stack with address ip to port p.
func NewPeer(p *netfab.Port, ip netip.Addr) (*Peer, error) {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	ep := channel.New(256, uint32(netfab.DefaultMTU+14), tcpip.LinkAddress(p.MAC))
	if err := s.CreateNIC(1, ethernet.New(ep)); err != nil {
		return nil, fmt.Errorf("peer: %s", err)
	}
	if err := s.AddProtocolAddress(1, tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFrom4(ip.As4()), PrefixLen: 24}}, stack.AddressProperties{}); err != nil {
		return nil, fmt.Errorf("peer: %s", err)
	}
	s.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, NIC: 1}})
	pr := &Peer{Stack: s, ep: ep, f: p.QEMUFile(), done: make(chan struct{})}
	pr.ctx, pr.stop = context.WithCancel(context.Background())
	go pr.in()
	go pr.out()
	return pr, nil
}

func (pr *Peer) in() {
	r := bufio.NewReader(pr.f)
	var hdr [4]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return
		}
		frame := make([]byte, binary.BigEndian.Uint32(hdr[:]))
		if _, err := io.ReadFull(r, frame); err != nil {
			return
		}
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(frame)})
		pr.ep.InjectInbound(0, pkt)
		pkt.DecRef()
	}
}

func (pr *Peer) out() {
	defer close(pr.done)
	for {
		pkt := pr.ep.ReadContext(pr.ctx)
		if pkt == nil {
			return
		}
		v := pkt.ToView()
		frame := binary.BigEndian.AppendUint32(nil, uint32(v.Size()))
		frame = append(frame, v.AsSlice()...)
		v.Release()
		pkt.DecRef()
		if _, err := pr.f.Write(frame); err != nil {
			return
		}
	}
}

// Close detaches the peer.
func (pr *Peer) Close() {
	pr.stop()
	<-pr.done
	pr.f.Close()
	pr.ep.Close()
	pr.Stack.Close()
}

// UDPAddr is ip:port for gonet dialing on a peer.
func UDPAddr(ip netip.Addr, port int) *tcpip.FullAddress {
	a, _ := FullAddr(ip, port)
	return &a
}

// FullAddr is ip:port on NIC 1, with ip's network protocol (IPv4, or IPv6
// for an IPv6 address that is not IPv4-mapped).
func FullAddr(ip netip.Addr, port int) (tcpip.FullAddress, tcpip.NetworkProtocolNumber) {
	ip = ip.Unmap()
	if ip.Is4() {
		return tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4(ip.As4()), Port: uint16(port)}, ipv4.ProtocolNumber
	}
	return tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom16(ip.As16()), Port: uint16(port)}, ipv6.ProtocolNumber
}
