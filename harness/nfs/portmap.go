package nfs

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"

	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/internal/connset"
	"nbh.dev/nbh/internal/guard"
)

// The RPC portmapper (program 100000, RFC 1833) on TCP and UDP port 111, so
// clients that do not pin ports (klibc's nfsmount, mount.nfs, the kernel's
// own MOUNT client) find MOUNT and NFS: version 2 (NULL, GETPORT, DUMP) for
// IPv4 clients, and rpcbind versions 3 and 4 (NULL, GETADDR), which IPv6
// clients must use: a port number alone names no IPv6 address.

const (
	PortmapPort = 111

	progPortmap = 100000
	progNFS     = 100003
	progMount   = 100005

	ipprotoTCP = 6
	ipprotoUDP = 17
)

// Mapping is one registered service.
type Mapping struct{ Prog, Vers, Prot, Port uint32 }

// Mappings are what the lab's portmapper advertises: MOUNT and NFS share
// TCP port 2049 (go-nfs serves both there), version 3 only (go-nfs answers
// MOUNT in the version 3 format; other versions get PROG_MISMATCH); nothing
// is offered over UDP but the portmapper itself.
func Mappings() []Mapping { return slices.Clone(mappings) }

var mappings = []Mapping{
	{progPortmap, 2, ipprotoTCP, PortmapPort},
	{progPortmap, 2, ipprotoUDP, PortmapPort},
	{progNFS, 3, ipprotoTCP, Port},
	{progMount, 3, ipprotoTCP, Port},
}

// Portmapper is a running portmapper.
type Portmapper struct {
	tl    *timeline.Timeline
	udp   []net.PacketConn
	conns connset.Set    // TCP
	wg    sync.WaitGroup // UDP
}

// Disconnect cuts the TCP connections of the client at ip (a guest that
// is gone).
func (p *Portmapper) Disconnect(ip string) int { return p.conns.CloseFrom(ip) }

// ServePortmapper serves on the given TCP listener (or none: nil) and UDP
// sockets.
func ServePortmapper(ln net.Listener, pcs []net.PacketConn, tl *timeline.Timeline) *Portmapper {
	p := &Portmapper{tl: tl, udp: pcs}
	p.conns.Report = func(what string, v any, stack []byte) {
		p.emit(timeline.Event{Kind: "panic", Msg: guard.Message(what, v), Detail: map[string]any{"stack": string(stack)}})
	}
	if ln != nil {
		p.conns.Serve(ln, p.serveTCP)
	}
	for _, pc := range pcs {
		p.wg.Add(1)
		go p.serveUDP(pc)
	}
	return p
}

// Close stops the portmapper, cutting the connections clients left open (a
// guest that powered off never closes its own).
func (p *Portmapper) Close() error {
	p.conns.Close()
	for _, pc := range p.udp {
		pc.Close()
	}
	p.wg.Wait()
	return nil
}

func (p *Portmapper) serveUDP(pc net.PacketConn) {
	defer p.wg.Done()
	buf := make([]byte, 9000)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		var reply []byte
		guard.Run("a UDP call from "+from.String(), p.conns.Report, func() { reply = p.handle(buf[:n], addrOf(from), addrOf(pc.LocalAddr())) })
		if reply != nil {
			pc.WriteTo(reply, from)
		}
	}
}

// serveTCP answers the calls of one TCP connection.
func (p *Portmapper) serveTCP(c net.Conn) {
	r := bufio.NewReader(c)
	for {
		msg, err := readRecord(r, maxRecord)
		if err != nil {
			return
		}
		reply := p.handle(msg, addrOf(c.RemoteAddr()), addrOf(c.LocalAddr()))
		if reply == nil {
			return
		}
		hdr := binary.BigEndian.AppendUint32(nil, 0x80000000|uint32(len(reply)))
		if _, err := c.Write(append(hdr, reply...)); err != nil {
			return
		}
	}
}

// addrOf is the host of a, "" for none (a gVisor connection that was
// reset has no address: a guest can do that any time).
func addrOf(a net.Addr) string {
	if a == nil {
		return ""
	}
	h, _, _ := net.SplitHostPort(a.String())
	return h
}

// maxRecord bounds an RPC record over TCP; portmapper calls are tiny.
const maxRecord = 64 << 10

// readRecord reads one RPC record of at most max bytes (RFC 5531 record
// marking: fragments of a 31-bit length, the last one flagged).
func readRecord(r io.Reader, max int) ([]byte, error) {
	var msg []byte
	for {
		var h [4]byte
		if _, err := io.ReadFull(r, h[:]); err != nil {
			return nil, err
		}
		v := binary.BigEndian.Uint32(h[:])
		n := int(v & 0x7fffffff)
		if len(msg)+n > max {
			return nil, errors.New("rpc record too large")
		}
		frag := make([]byte, n)
		if _, err := io.ReadFull(r, frag); err != nil {
			return nil, err
		}
		msg = append(msg, frag...)
		if v&0x80000000 != 0 {
			return msg, nil
		}
	}
}

// Call is a parsed RPC call header.
type Call struct {
	XID, Prog, Vers, Proc uint32
	Args                  []byte
}

// ParseCall parses an ONC RPC v2 call (RFC 5531), skipping the credential
// and verifier.
func ParseCall(b []byte) (*Call, error) {
	d := &xdr{b: b}
	c := &Call{XID: d.u32()}
	mt, v := d.u32(), d.u32()
	if d.err != nil {
		return nil, d.err // cut short: not even a header to answer
	}
	if mt != 0 {
		return nil, errors.New("not a call")
	}
	if v != 2 {
		return c, errRPCVersion
	}
	c.Prog, c.Vers, c.Proc = d.u32(), d.u32(), d.u32()
	for i := 0; i < 2; i++ { // credential, verifier
		d.u32()
		d.opaque(400)
	}
	if d.err != nil {
		return nil, d.err
	}
	c.Args = d.b[d.off:]
	return c, nil
}

var errRPCVersion = errors.New("rpc version is not 2")

type xdr struct {
	b   []byte
	off int
	err error
}

func (d *xdr) u32() uint32 {
	if d.err != nil || d.off+4 > len(d.b) {
		d.err = errors.New("short rpc message")
		return 0
	}
	v := binary.BigEndian.Uint32(d.b[d.off:])
	d.off += 4
	return v
}

func (d *xdr) opaque(max int) []byte {
	n := int(d.u32())
	if d.err != nil {
		return nil
	}
	if n > max || d.off+n > len(d.b) {
		d.err = errors.New("bad opaque length in rpc message")
		return nil
	}
	v := d.b[d.off : d.off+n]
	d.off += (n + 3) &^ 3
	if d.off > len(d.b) {
		d.off = len(d.b)
	}
	return v
}

// Accept states of a reply.
const (
	success      = 0
	progUnavail  = 1
	progMismatch = 2
	procUnavail  = 3
	garbageArgs  = 4
)

func acceptedReply(xid, stat uint32, body []byte) []byte {
	r := binary.BigEndian.AppendUint32(nil, xid)
	r = binary.BigEndian.AppendUint32(r, 1) // reply
	r = binary.BigEndian.AppendUint32(r, 0) // accepted
	r = binary.BigEndian.AppendUint32(r, 0) // verifier: AUTH_NONE
	r = binary.BigEndian.AppendUint32(r, 0)
	r = binary.BigEndian.AppendUint32(r, stat)
	return append(r, body...)
}

// handle answers one call that came from the address from to the address
// local; nil means drop it (not even a header parsed).
func (p *Portmapper) handle(msg []byte, from, local string) []byte {
	c, err := ParseCall(msg)
	if errors.Is(err, errRPCVersion) {
		r := binary.BigEndian.AppendUint32(nil, c.XID)
		r = binary.BigEndian.AppendUint32(r, 1) // reply
		r = binary.BigEndian.AppendUint32(r, 1) // denied
		r = binary.BigEndian.AppendUint32(r, 0) // RPC_MISMATCH
		r = binary.BigEndian.AppendUint32(r, 2)
		return binary.BigEndian.AppendUint32(r, 2)
	}
	if err != nil {
		p.emit(timeline.Event{Kind: "error", Addr: from, Msg: err.Error()})
		return nil
	}
	if c.Prog != progPortmap {
		return acceptedReply(c.XID, progUnavail, nil)
	}
	switch c.Vers {
	case 2:
	case 3, 4:
		return p.rpcbind(c, from, local)
	default:
		return acceptedReply(c.XID, progMismatch, []byte{0, 0, 0, 2, 0, 0, 0, 4})
	}
	switch c.Proc {
	case 0: // NULL
		return acceptedReply(c.XID, success, nil)
	case 3: // GETPORT
		d := &xdr{b: c.Args}
		m := Mapping{Prog: d.u32(), Vers: d.u32(), Prot: d.u32()}
		if d.err != nil {
			return acceptedReply(c.XID, garbageArgs, nil)
		}
		var port uint32
		for _, reg := range mappings {
			if reg.Prog == m.Prog && reg.Vers == m.Vers && reg.Prot == m.Prot {
				port = reg.Port
			}
		}
		p.emit(timeline.Event{Kind: "getport", Addr: from,
			Msg: fmt.Sprintf("program %d v%d %s -> %d", m.Prog, m.Vers, protName(m.Prot), port)})
		return acceptedReply(c.XID, success, binary.BigEndian.AppendUint32(nil, port))
	case 4: // DUMP
		var body []byte
		for _, m := range mappings {
			body = binary.BigEndian.AppendUint32(body, 1)
			for _, v := range []uint32{m.Prog, m.Vers, m.Prot, m.Port} {
				body = binary.BigEndian.AppendUint32(body, v)
			}
		}
		body = binary.BigEndian.AppendUint32(body, 0)
		p.emit(timeline.Event{Kind: "dump", Addr: from})
		return acceptedReply(c.XID, success, body)
	}
	return acceptedReply(c.XID, procUnavail, nil)
}

// rpcbind answers versions 3 and 4 (RFC 1833): NULL and GETADDR, whose
// answer is a universal address (RFC 5665) on the address the call came to.
func (p *Portmapper) rpcbind(c *Call, from, local string) []byte {
	switch c.Proc {
	case 0: // NULL
		return acceptedReply(c.XID, success, nil)
	case 3: // GETADDR
		d := &xdr{b: c.Args}
		prog, vers := d.u32(), d.u32()
		netid := string(d.opaque(64))
		d.opaque(128) // r_addr
		d.opaque(128) // r_owner
		if d.err != nil {
			return acceptedReply(c.XID, garbageArgs, nil)
		}
		prot := uint32(ipprotoTCP)
		if strings.HasPrefix(netid, "udp") {
			prot = ipprotoUDP
		}
		uaddr := ""
		for _, reg := range mappings {
			if reg.Prog == prog && reg.Vers == vers && reg.Prot == prot {
				uaddr = universalAddr(local, reg.Port)
			}
		}
		p.emit(timeline.Event{Kind: "getaddr", Addr: from,
			Msg: fmt.Sprintf("program %d v%d %s -> %q", prog, vers, netid, uaddr)})
		return acceptedReply(c.XID, success, xdrString(uaddr))
	}
	return acceptedReply(c.XID, procUnavail, nil)
}

// universalAddr is host and port as rpcbind writes them: the address, then
// the port's two bytes in decimal ("fd4e:4248::2.8.1" is port 2049).
func universalAddr(host string, port uint32) string {
	return fmt.Sprintf("%s.%d.%d", host, port>>8, port&0xff)
}

func xdrString(s string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(s)))
	b = append(b, s...)
	return append(b, make([]byte, (4-len(s)%4)%4)...)
}

func protName(p uint32) string {
	switch p {
	case ipprotoTCP:
		return "tcp"
	case ipprotoUDP:
		return "udp"
	}
	return fmt.Sprint(p)
}

func (p *Portmapper) emit(e timeline.Event) {
	e.Source = "portmap"
	p.tl.Emit(e)
}
