package netfab

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
)

// ListenTCP listens on port of both of the host's addresses, IPv4 and IPv6:
// one listener, so that a service keeps one table of clients whichever
// address a guest comes to.
func (f *Fabric) ListenTCP(port int) (net.Listener, error) {
	var lns []net.Listener
	for _, ip := range f.HostAddrs() {
		a, proto := FullAddr(ip, port)
		ln, err := gonet.ListenTCP(f.Stack, a, proto)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, fmt.Errorf("netfab: listen tcp %s: %w", netip.AddrPortFrom(ip, uint16(port)), err)
		}
		lns = append(lns, ln)
	}
	return merge(lns), nil
}

// ListenUDP opens port on both of the host's addresses: one socket each.
func (f *Fabric) ListenUDP(port int) ([]net.PacketConn, error) {
	var pcs []net.PacketConn
	for _, ip := range f.HostAddrs() {
		a, proto := FullAddr(ip, port)
		pc, err := gonet.DialUDP(f.Stack, &a, nil, proto)
		if err != nil {
			for _, c := range pcs {
				c.Close()
			}
			return nil, fmt.Errorf("netfab: listen udp %s: %w", netip.AddrPortFrom(ip, uint16(port)), err)
		}
		pcs = append(pcs, pc)
	}
	return pcs, nil
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
