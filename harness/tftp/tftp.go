// Package tftp is the lab's read-only TFTP server (RFC 1350) with option
// negotiation (RFC 2347): blksize (2348), tsize and timeout (2349) and
// windowsize (7440). Window sizes matter here: at one block per round trip a
// 33 MB arm64 kernel takes tens of seconds under TCG.
//
// Files are served from an os.Root, so "..", absolute paths and symlinks that
// leave the root are refused by the operating system's own rules.
package tftp

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"nbh.dev/nbh/harness/bootfile"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/internal/guard"
)

const (
	opRRQ   = 1
	opWRQ   = 2
	opDATA  = 3
	opACK   = 4
	opERROR = 5
	opOACK  = 6

	errUndefined  = 0
	errNotFound   = 1
	errAccess     = 2
	errIllegal    = 4
	errOptionsBad = 8

	maxBlksize    = 65464
	maxWindowsize = 64
	retries       = 5
)

// errSizeQuery is a client ending the transfer right after the option
// acknowledgement, as UEFI firmware does to learn a file's size.
var errSizeQuery = errors.New("client ended the transfer after the option acknowledgement (size query)")

// errRead is a failure to read the served file mid-transfer; the client is
// told with an ERROR packet instead of being left to time out.
var errRead = errors.New("reading the file failed")

// Request is a parsed read or write request.
type Request struct {
	Op       int
	Filename string
	Mode     string
	Options  map[string]string // lower-cased names
}

// ParseRequest parses an RRQ/WRQ packet.
func ParseRequest(b []byte) (*Request, error) {
	if len(b) < 4 {
		return nil, errors.New("short packet")
	}
	op := int(binary.BigEndian.Uint16(b))
	if op != opRRQ && op != opWRQ {
		return nil, fmt.Errorf("opcode %d is not a request", op)
	}
	fields := bytes.Split(b[2:], []byte{0})
	if len(fields) < 3 || len(fields[len(fields)-1]) != 0 {
		return nil, errors.New("request fields not NUL-terminated")
	}
	fields = fields[:len(fields)-1]
	if len(fields)%2 != 0 {
		return nil, errors.New("odd number of request fields")
	}
	r := &Request{Op: op, Filename: string(fields[0]), Mode: strings.ToLower(string(fields[1])), Options: map[string]string{}}
	if r.Filename == "" {
		return nil, errors.New("empty file name")
	}
	for i := 2; i+1 < len(fields); i += 2 {
		r.Options[strings.ToLower(string(fields[i]))] = string(fields[i+1])
	}
	return r, nil
}

// Network is where a server listens: the lab's fabric host
// (*netfab.Fabric).
type Network interface {
	// ListenUDPAt opens port 69 for requests from any client.
	ListenUDPAt(addr netip.AddrPort) (net.PacketConn, error)
	// DialUDP opens a transfer's own port, speaking with its client alone;
	// it fails for a client of another IP family than laddr's.
	DialUDP(laddr netip.Addr, raddr netip.AddrPort) (net.Conn, error)
}

// Server serves one root folder on UDP port 69 of one host address.
type Server struct {
	open    bootfile.Opener
	tl      *timeline.Timeline
	network Network
	addr    netip.Addr
	conn    net.PacketConn
	wg      sync.WaitGroup
	close   chan struct{}
	// maxBlk is the largest block size the server agrees to.
	maxBlk atomic.Int32
	// The size of the IP header of the family it serves (IPv4 or IPv6).
	ipHeader int
}

// FitMTU makes the server agree to no block larger than a datagram of mtu
// bytes can carry whole: firmware TFTP clients do not reassemble fragments,
// and the fabric drops frames over its MTU.
func (s *Server) FitMTU(mtu int) { s.maxBlk.Store(int32(mtu - s.ipHeader - 8 - 4)) }

// Start serves what open opens on addr:69 of n.
func Start(n Network, addr netip.Addr, open bootfile.Opener, tl *timeline.Timeline) (*Server, error) {
	addr = addr.Unmap()
	hdr := 40
	if addr.Is4() {
		hdr = 20
	}
	conn, err := n.ListenUDPAt(netip.AddrPortFrom(addr, 69))
	if err != nil {
		return nil, fmt.Errorf("tftp: %w", err)
	}
	s := &Server{open: open, tl: tl, network: n, addr: addr, ipHeader: hdr, conn: conn, close: make(chan struct{})}
	s.maxBlk.Store(maxBlksize)
	s.wg.Add(1)
	go s.serve()
	return s, nil
}

// Close stops the server and waits for transfers to end.
func (s *Server) Close() error {
	close(s.close)
	s.conn.Close()
	s.wg.Wait()
	return nil
}

func (s *Server) serve() {
	defer s.wg.Done()
	buf := make([]byte, 2048)
	for {
		n, peer, err := s.conn.ReadFrom(buf)
		if err != nil {
			return
		}
		pkt := append([]byte(nil), buf[:n]...)
		udp := peer.(*net.UDPAddr)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer guard.Recover("a TFTP request from "+udp.String(), func(what string, v any, stack []byte) {
				s.emit(timeline.Event{Addr: udp.IP.String(), Kind: "panic", Msg: guard.Message(what, v), Detail: map[string]any{"stack": string(stack)}})
			})
			s.transfer(pkt, udp)
		}()
	}
}

// transfer runs one request on its own port (the server's transfer ID).
func (s *Server) transfer(pkt []byte, peer *net.UDPAddr) {
	// A client of the other IP family gets no answer: DialUDP fails.
	conn, err := s.network.DialUDP(s.addr, peer.AddrPort())
	if err != nil {
		return
	}
	defer conn.Close()
	// The server closing cuts the transfer; the watcher ends with it.
	finished := make(chan struct{})
	defer close(finished)
	go func() {
		select {
		case <-s.close:
			conn.Close()
		case <-finished:
		}
	}()
	client := peer.String()
	addr := peer.IP.String()
	req, err := ParseRequest(pkt)
	if err != nil {
		s.emit(timeline.Event{Addr: addr, Kind: "error", Msg: fmt.Sprintf("%s: malformed request: %v", client, err)})
		sendError(conn, errIllegal, err.Error())
		return
	}
	if req.Op == opWRQ {
		s.emit(timeline.Event{Addr: addr, Kind: "error", Msg: fmt.Sprintf("%s: write request for %q refused", client, req.Filename)})
		sendError(conn, errAccess, "read-only server")
		return
	}
	name := strings.TrimLeft(strings.ReplaceAll(req.Filename, "\\", "/"), "/")
	s.emit(timeline.Event{Addr: addr, Kind: "request", Msg: req.Filename, Detail: map[string]any{"client": client, "options": req.Options}})
	f, err := s.open(name, addr)
	if err != nil {
		code, msg := errNotFound, "file not found"
		if !errors.Is(err, os.ErrNotExist) {
			code, msg = errAccess, "access violation"
		}
		s.emit(timeline.Event{Addr: addr, Kind: "not-found", Msg: req.Filename, Detail: map[string]any{"client": client, "error": err.Error()}})
		sendError(conn, code, msg)
		return
	}
	defer f.Close()
	start := time.Now()
	x := &xfer{conn: conn, f: f, size: f.Size(), blksize: 512, maxBlk: int(s.maxBlk.Load()), window: 1, timeout: time.Second,
		meter: s.tl.Meter(timeline.Event{Source: "tftp", Addr: addr, Msg: req.Filename}, f.Size(), true)}
	oack := x.negotiate(req.Options)
	sent, err := x.run(oack)
	x.meter.Close() // its last count before the transfer's end
	d := time.Since(start)
	detail := map[string]any{"client": client, "bytes": sent, "seconds": d.Seconds(), "blksize": x.blksize, "windowsize": x.window}
	if errors.Is(err, errSizeQuery) {
		// Firmware asks for tsize and then ends the transfer: a size probe
		// (its ERROR's code and message kept).
		detail["error"] = err.Error()
		s.emit(timeline.Event{Addr: addr, Kind: "size-query", Msg: fmt.Sprintf("%s (%d bytes)", req.Filename, x.size), Detail: detail})
		return
	}
	if err != nil {
		if errors.Is(err, errRead) {
			sendError(conn, errUndefined, "transfer interrupted")
		}
		detail["error"] = err.Error()
		s.emit(timeline.Event{Addr: addr, Kind: "aborted", Msg: req.Filename, Detail: detail})
		return
	}
	s.emit(timeline.Event{Addr: addr, Kind: "transfer", Msg: fmt.Sprintf("%s %d bytes in %.2fs", req.Filename, sent, d.Seconds()), Detail: detail})
}

func (s *Server) emit(e timeline.Event) {
	e.Source = "tftp"
	s.tl.Emit(e)
}

type xfer struct {
	conn    net.Conn
	f       io.ReaderAt
	size    int64
	blksize int
	maxBlk  int
	window  int
	timeout time.Duration
	meter   *timeline.Meter // the bytes acknowledged, as progress
	// sizeAsked: the request asked for tsize (a client that ends the
	// transfer at the option acknowledgement then only wanted the size).
	sizeAsked bool
}

// clientError is the code and message of the client's ERROR packet in buf
// (its opcode first), as "error CODE: MESSAGE".
func clientError(buf []byte) string {
	code := binary.BigEndian.Uint16(buf[2:])
	msg, _, _ := strings.Cut(string(buf[4:]), "\x00")
	msg = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return -1
		}
		return r
	}, msg)
	if len(msg) > 100 {
		msg = msg[:100]
	}
	return fmt.Sprintf("error %d: %q", code, msg)
}

// negotiate applies the options the server supports and returns the OACK
// payload (nil if no option was accepted).
func (x *xfer) negotiate(opts map[string]string) []byte {
	var ack []byte
	add := func(k, v string) { ack = append(append(append(append(ack, k...), 0), v...), 0) }
	if v, ok := opts["blksize"]; ok {
		if n, err := strconv.Atoi(v); err == nil && n >= 8 {
			x.blksize = min(n, x.maxBlk)
			add("blksize", strconv.Itoa(x.blksize))
		}
	}
	if v, ok := opts["windowsize"]; ok {
		if n, err := strconv.Atoi(v); err == nil && n >= 1 {
			x.window = min(n, maxWindowsize)
			add("windowsize", strconv.Itoa(x.window))
		}
	}
	if v, ok := opts["timeout"]; ok {
		if n, err := strconv.Atoi(v); err == nil && n >= 1 && n <= 255 {
			x.timeout = time.Duration(n) * time.Second
			add("timeout", v)
		}
	}
	if _, ok := opts["tsize"]; ok {
		add("tsize", strconv.FormatInt(x.size, 10))
		x.sizeAsked = true
	}
	return ack
}

// run sends the file in windows, going back to the first unacknowledged block
// on a timeout or a short acknowledgement.
func (x *xfer) run(oack []byte) (int64, error) {
	buf := make([]byte, 4+x.blksize+16)
	if oack != nil {
		pkt := append([]byte{0, opOACK}, oack...)
		acked := false
		for try := 0; try < retries && !acked; try++ {
			if _, err := x.conn.Write(pkt); err != nil {
				return 0, err
			}
			op, blk, err := x.readAck(buf)
			if err != nil {
				continue
			}
			if op == opERROR {
				// Asking the size and ending there is how firmware
				// probes a file; any other error is the client's.
				if x.sizeAsked {
					return 0, fmt.Errorf("%w: %s", errSizeQuery, clientError(buf))
				}
				return 0, fmt.Errorf("the client refused the option acknowledgement: %s", clientError(buf))
			}
			acked = blk == 0
		}
		if !acked {
			return 0, errors.New("no acknowledgement of options")
		}
	}
	nblocks := x.size/int64(x.blksize) + 1 // the last block is short, maybe empty
	var next int64 = 1                     // next block to send
	var acked int64                        // highest block acknowledged
	fails := 0
	data := make([]byte, 4+x.blksize)
	for acked < nblocks {
		end := min(acked+int64(x.window), nblocks)
		for b := next; b <= end; b++ {
			off := (b - 1) * int64(x.blksize)
			n, err := x.f.ReadAt(data[4:], off)
			if err != nil && err != io.EOF {
				return acked * int64(x.blksize), fmt.Errorf("%w at byte %d: %v", errRead, off, err)
			}
			binary.BigEndian.PutUint16(data[0:], opDATA)
			binary.BigEndian.PutUint16(data[2:], uint16(b))
			if _, err := x.conn.Write(data[:4+n]); err != nil {
				return 0, err
			}
		}
		next = end + 1
		op, blk, err := x.readAck(buf)
		if err != nil {
			fails++
			if fails > retries {
				return acked * int64(x.blksize), fmt.Errorf("client stopped acknowledging at block %d", acked)
			}
			next = acked + 1
			continue
		}
		if op == opERROR {
			return acked * int64(x.blksize), fmt.Errorf("the client ended the transfer at block %d: %s", acked, clientError(buf))
		}
		// Map the 16-bit block number into the current window.
		for b := end; b > acked; b-- {
			if uint16(b) == blk {
				x.meter.Add(int(min(b*int64(x.blksize), x.size) - min(acked*int64(x.blksize), x.size)))
				acked = b
				fails = 0
				break
			}
		}
		next = acked + 1
	}
	return x.size, nil
}

// readAck waits for an ACK or ERROR, ignoring anything else.
func (x *xfer) readAck(buf []byte) (op int, blk uint16, err error) {
	deadline := time.Now().Add(x.timeout)
	for {
		x.conn.SetReadDeadline(deadline)
		n, err := x.conn.Read(buf)
		if err != nil {
			return 0, 0, err
		}
		if n < 4 {
			continue
		}
		switch op := int(binary.BigEndian.Uint16(buf)); op {
		case opACK, opERROR:
			clear(buf[n:]) // an ERROR's message ends in the packet
			return op, binary.BigEndian.Uint16(buf[2:]), nil
		}
	}
}

func sendError(conn net.Conn, code int, msg string) {
	b := []byte{0, opERROR, 0, byte(code)}
	b = append(append(b, msg...), 0)
	conn.Write(b)
}
