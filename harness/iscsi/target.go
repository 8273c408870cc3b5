package iscsi

import (
	"bufio"
	"crypto/md5"
	"crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"

	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/internal/connset"
	"nbh.dev/nbh/internal/guard"
	"nbh.dev/nbh/internal/rules"
)

// Port is the iSCSI well-known port.
const Port = 3260

// What the target receives at most in one PDU's data segment: 8 KiB while
// logging in (RFC 7143 13.12: the login phase's MaxRecvDataSegmentLength),
// then what it declares. A longer one is refused before it is read, so a
// guest cannot make the target hold megabytes per connection.
const (
	maxLoginData = 8192
	maxRecvData  = 262144
)

// CHAP is a one-way CHAP secret the initiator must prove.
type CHAP struct{ User, Secret string }

// export is one target name as one client sees it.
type export struct {
	lun  *LUN
	chap *CHAP
}

// Server is a running target.
type Server struct {
	tl    *timeline.Timeline
	addr  string // portal address, for SendTargets
	conns connset.Set

	mu      sync.Mutex
	exports map[string]map[string]export // IQN -> client IP -> export
}

// Serve serves iSCSI on ln; portal is the address SendTargets reports.
func Serve(ln net.Listener, portal string, tl *timeline.Timeline) *Server {
	s := &Server{tl: tl, addr: portal, exports: map[string]map[string]export{}}
	s.conns.Report = func(what string, v any, stack []byte) {
		s.emit(timeline.Event{Kind: "panic", Msg: guard.Message(what, v), Detail: map[string]any{"stack": string(stack)}})
	}
	// One initiator address's sessions hold at most MaxPerGuest ×
	// maxPendingBytes of write buffers (a booting initiator needs one or
	// two, with a loader's before it; a dual-stack guest has two
	// addresses).
	s.conns.PerPeer = MaxPerGuest
	if rules.On(rules.ISCSIMemory) {
		s.conns.Refused = func(peer string) {
			s.emit(timeline.Event{Kind: "refused", Addr: peer, Msg: fmt.Sprintf("a connection past the %d one initiator may hold open", MaxPerGuest)})
		}
	} else {
		s.conns.PerPeer = 0
	}
	s.conns.Serve(ln, s.serve)
	return s
}

// MaxPerGuest is how many connections one initiator address may hold open.
const MaxPerGuest = 8

// Unexport withdraws target iqn from the client at ip, if lun is still
// what it serves there.
func (s *Server) Unexport(iqn, ip string, lun *LUN) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.exports[iqn][ip]; ok && e.lun == lun {
		delete(s.exports[iqn], ip)
	}
}

// Export makes lun the target iqn for the client at ip, behind chap if set.
func (s *Server) Export(iqn, ip string, lun *LUN, chap *CHAP) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.exports[iqn] == nil {
		s.exports[iqn] = map[string]export{}
	}
	s.exports[iqn][ip] = export{lun: lun, chap: chap}
}

// Disconnect ends the sessions of the initiator at ip (a guest that is
// gone: it never logs out).
func (s *Server) Disconnect(ip string) int { return s.conns.CloseFrom(ip) }

// Close stops the target and every session.
func (s *Server) Close() error { return s.conns.Close() }

// serve runs one connection's session.
func (s *Server) serve(c net.Conn) {
	sc := &session{s: s, c: c, w: bufio.NewWriterSize(c, 256<<10), ip: hostOf(c.RemoteAddr()),
		maxSend: 8192, maxBurst: 262144, firstBurst: 65536, tasks: map[uint32]*task{}}
	err := sc.run()
	c.Close()
	sc.finish(err)
}

// hostOf is the host of a, "" for none (a gVisor connection that was
// reset has no address: a guest can do that any time).
func hostOf(a net.Addr) string {
	if a == nil {
		return ""
	}
	h, _, _ := net.SplitHostPort(a.String())
	return h
}

func (s *Server) emit(e timeline.Event) {
	e.Source = "iscsi"
	s.tl.Emit(e)
}

// session is one connection (MaxConnections=1: one session each).
type session struct {
	s  *Server
	c  net.Conn
	w  *bufio.Writer
	ip string

	initiator, target string
	discovery         bool
	lun               *LUN

	statSN, expCmdSN uint32
	maxSend          int // the initiator's MaxRecvDataSegmentLength
	maxBurst         int
	firstBurst       int
	immediateData    bool
	nextTTT          uint32

	tasks   map[uint32]*task // writes waiting for data, by target transfer tag
	pending int              // bytes of their buffers

	commands, readBytes, writeBytes int64
	loggedOut                       bool
}

// task is a write command waiting for its data.
type task struct {
	itt, ttt uint32
	cdb      []byte
	buf      []byte
	got      int
	burstEnd int
	r2tsn    uint32
	writeAt  int64
}

func (sc *session) finish(err error) {
	if sc.target == "" {
		return
	}
	d := map[string]any{"initiator": sc.initiator, "commands": sc.commands, "read_bytes": sc.readBytes, "written_bytes": sc.writeBytes}
	kind := "logout"
	if !sc.loggedOut {
		kind = "disconnect"
		if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
			d["error"] = err.Error()
		}
	}
	sc.s.emit(timeline.Event{Kind: kind, Addr: sc.ip, Msg: sc.target, Detail: d})
}

func (sc *session) send(p *PDU) error {
	_, err := sc.w.Write(p.Bytes())
	return err
}

// stamp fills StatSN (advancing it when status is carried), ExpCmdSN and
// MaxCmdSN.
func (sc *session) stamp(p *PDU, status bool) {
	p.put32(24, sc.statSN)
	if status {
		sc.statSN++
	}
	p.put32(28, sc.expCmdSN)
	p.put32(32, sc.expCmdSN+63)
}

// command accounts for a command's CmdSN.
func (sc *session) command(p *PDU) {
	cmdSN := p.u32(24)
	if !p.Immediate() && int32(cmdSN-sc.expCmdSN) >= 0 {
		sc.expCmdSN = cmdSN + 1
	}
}

func (sc *session) run() error {
	r := bufio.NewReaderSize(sc.c, 256<<10)
	first, err := readPDU(r, maxLoginData)
	if err != nil {
		return err
	}
	if first.Opcode() != opLoginReq {
		return fmt.Errorf("first PDU is opcode %#x, not a login", first.Opcode())
	}
	if err := sc.login(first, r); err != nil {
		return err
	}
	for {
		if err := sc.w.Flush(); err != nil {
			return err
		}
		p, err := readPDU(r, maxRecvData)
		if err != nil {
			return err
		}
		if err := sc.handle(p); err != nil {
			return err
		}
		if sc.loggedOut {
			return sc.w.Flush()
		}
	}
}

func (sc *session) handle(p *PDU) error {
	if sc.discovery {
		// RFC 7143 4.3: a discovery session carries Text, Logout and NOP
		// only; it has no LUN for SCSI, data or task management.
		switch p.Opcode() {
		case opNOPOut, opTextReq, opLogoutReq:
		default:
			sc.s.emit(timeline.Event{Kind: "refused", Addr: sc.ip, Msg: fmt.Sprintf("opcode %#x on a discovery session", p.Opcode())})
			return sc.reject(p)
		}
	}
	switch p.Opcode() {
	case opNOPOut:
		sc.command(p)
		if p.ITT() == 0xffffffff {
			return nil // answer to our ping
		}
		r := &PDU{Data: p.Data}
		r.BHS[0], r.BHS[1] = opNOPIn, flagFinal
		copy(r.BHS[8:16], p.BHS[8:16])
		r.put32(16, p.ITT())
		r.put32(20, 0xffffffff)
		sc.stamp(r, true)
		return sc.send(r)
	case opSCSICmd:
		sc.command(p)
		sc.commands++
		return sc.scsi(p)
	case opDataOut:
		return sc.dataOut(p)
	case opTextReq:
		sc.command(p)
		return sc.text(p)
	case opTMFReq:
		sc.command(p)
		r := &PDU{}
		r.BHS[0], r.BHS[1], r.BHS[2] = opTMFResp, flagFinal, sc.taskManagement(p)
		r.put32(16, p.ITT())
		sc.stamp(r, true)
		return sc.send(r)
	case opLogoutReq:
		sc.command(p)
		r := &PDU{}
		r.BHS[0], r.BHS[1] = opLogoutResp, flagFinal
		r.put32(16, p.ITT())
		sc.stamp(r, true)
		sc.loggedOut = true
		return sc.send(r)
	}
	return sc.reject(p)
}

// taskManagement carries out a task management function and returns its
// response code (RFC 7143 11.5, 11.6). Commands run to completion before
// the next PDU is read, so the only tasks that can still be aborted are
// writes waiting for their data.
func (sc *session) taskManagement(p *PDU) byte {
	const (
		complete        = 0
		noSuchTask      = 1
		notSupported    = 5
		abortTask       = 1
		abortTaskSet    = 2
		clearACA        = 3
		clearTaskSet    = 4
		lunReset        = 5
		targetWarmReset = 6
	)
	fn := p.BHS[1] & 0x7f
	var code byte
	switch fn {
	case abortTask:
		code = noSuchTask
		for ttt, t := range sc.tasks {
			if t.itt == p.u32(20) {
				delete(sc.tasks, ttt)
				sc.pending -= len(t.buf)
				code = complete
			}
		}
	case abortTaskSet, clearTaskSet, lunReset, targetWarmReset:
		clear(sc.tasks)
		sc.pending = 0
		code = complete
	case clearACA:
		code = complete // no ACA is ever established
	default:
		code = notSupported // cold reset, task reassignment
	}
	sc.s.emit(timeline.Event{Kind: "task-management", Addr: sc.ip, Msg: fmt.Sprintf("function %d: response %d", fn, code)})
	return code
}

// reject answers a PDU the session cannot take with a Reject (protocol
// error) naming its header back.
func (sc *session) reject(p *PDU) error {
	r := &PDU{Data: append([]byte(nil), p.BHS[:]...)}
	r.BHS[0], r.BHS[1], r.BHS[2] = opReject, flagFinal, 0x04 // protocol error
	r.put32(16, 0xffffffff)
	sc.stamp(r, true)
	return sc.send(r)
}

// text answers discovery: SendTargets=All lists the targets this client
// may log in to.
func (sc *session) text(p *PDU) error {
	kv, err := ParseText(p.Data)
	if err != nil {
		return err
	}
	var out [][2]string
	for _, k := range kv {
		if k[0] == "SendTargets" {
			sc.s.mu.Lock()
			for iqn, byIP := range sc.s.exports {
				if _, ok := byIP[sc.ip]; ok && (k[1] == "All" || k[1] == iqn || k[1] == "") {
					out = append(out, [2]string{"TargetName", iqn}, [2]string{"TargetAddress", sc.portal()})
				}
			}
			sc.s.mu.Unlock()
		}
	}
	r := &PDU{Data: EncodeText(out)}
	r.BHS[0], r.BHS[1] = opTextResp, flagFinal
	r.put32(16, p.ITT())
	r.put32(20, 0xffffffff)
	sc.stamp(r, true)
	return sc.send(r)
}

// Login status classes and details (RFC 7143 11.13.5).
const (
	loginOK           = 0x0000
	loginAuthFailed   = 0x0201
	loginNotFound     = 0x0203
	loginMissingParam = 0x0207
	loginInitiatorErr = 0x0200
	loginUnsupportedV = 0x0205
)

// login runs the login phase to full feature phase (or a failure status).
func (sc *session) login(p *PDU, r *bufio.Reader) error {
	var chapID byte
	var challenge []byte
	var chap *CHAP
	replied := map[string]bool{}
	authed := false
	firstResponse := true
	tsih := uint16(1)
	keys := map[string]string{}
	for {
		kv, err := ParseText(p.Data)
		if err != nil {
			return sc.loginFail(p, loginInitiatorErr, err.Error())
		}
		for _, k := range kv {
			keys[k[0]] = k[1]
		}
		flags := p.Flags()
		transit, cont := flags&0x80 != 0, flags&0x40 != 0
		csg, nsg := int(flags>>2)&3, int(flags&3)
		if cont {
			return sc.loginFail(p, loginInitiatorErr, "continued login text is not supported")
		}
		if sc.initiator == "" {
			sc.initiator = keys["InitiatorName"]
			if sc.initiator == "" {
				return sc.loginFail(p, loginMissingParam, "no InitiatorName")
			}
			sc.discovery = keys["SessionType"] == "Discovery"
			if !sc.discovery {
				sc.target = keys["TargetName"]
				exp, ok := sc.s.lookup(sc.target, sc.ip)
				if !ok {
					return sc.loginFail(p, loginNotFound, fmt.Sprintf("no target %q for %s", sc.target, sc.ip))
				}
				sc.lun = exp.lun
				chap = exp.chap
				authed = chap == nil
			} else {
				authed = true
			}
		}
		var out [][2]string
		if firstResponse {
			out = append(out, [2]string{"TargetPortalGroupTag", "1"})
		}
		switch csg {
		case 0: // security negotiation
			if methods, ok := keys["AuthMethod"]; ok && !replied["AuthMethod"] {
				want := "None"
				if !authed {
					want = "CHAP"
				}
				if !contains(strings.Split(methods, ","), want) {
					return sc.loginFail(p, loginAuthFailed, "initiator does not offer AuthMethod="+want)
				}
				out = append(out, [2]string{"AuthMethod", want})
				replied["AuthMethod"] = true
			}
			if !authed {
				switch {
				case keys["CHAP_A"] != "" && challenge == nil:
					if !contains(strings.Split(keys["CHAP_A"], ","), "5") {
						return sc.loginFail(p, loginAuthFailed, "CHAP algorithm MD5 (5) not offered")
					}
					b := make([]byte, 17)
					rand.Read(b)
					chapID, challenge = b[0], b[1:]
					out = append(out, [2]string{"CHAP_A", "5"}, [2]string{"CHAP_I", strconv.Itoa(int(chapID))},
						[2]string{"CHAP_C", "0x" + hex.EncodeToString(challenge)})
				case keys["CHAP_R"] != "" && challenge != nil:
					if !chapOK(keys["CHAP_N"], keys["CHAP_R"], chap.User, chap.Secret, chapID, challenge) {
						return sc.loginFail(p, loginAuthFailed, "CHAP response does not match (user "+keys["CHAP_N"]+")")
					}
					authed = true
				}
			}
		case 1: // operational negotiation
			if !authed {
				return sc.loginFail(p, loginAuthFailed, "operational stage before authentication")
			}
			out = append(out, sc.negotiate(keys, replied)...)
		default:
			return sc.loginFail(p, loginInitiatorErr, fmt.Sprintf("login in stage %d", csg))
		}
		if transit && !authed {
			transit = false // stay until CHAP completes
		}
		resp := &PDU{Data: EncodeText(out)}
		resp.BHS[0] = opLoginResp
		resp.BHS[1] = byte(csg << 2)
		if transit {
			resp.BHS[1] |= 0x80 | byte(nsg)
		}
		resp.BHS[2], resp.BHS[3] = 0, 0
		copy(resp.BHS[8:14], p.BHS[8:14]) // ISID
		if transit && nsg == 3 {
			binary.BigEndian.PutUint16(resp.BHS[14:], tsih)
		}
		resp.put32(16, p.ITT())
		sc.command(p)
		if sc.expCmdSN == 0 {
			sc.expCmdSN = p.u32(24)
		}
		sc.stamp(resp, true)
		firstResponse = false
		if err := sc.send(resp); err != nil {
			return err
		}
		if err := sc.w.Flush(); err != nil {
			return err
		}
		if transit && nsg == 3 {
			if !sc.discovery {
				sc.s.emit(timeline.Event{Kind: "login", Addr: sc.ip, Msg: sc.target,
					Detail: map[string]any{"initiator": sc.initiator, "chap": keys["CHAP_N"] != ""}})
			}
			return nil
		}
		if p, err = readPDU(r, maxLoginData); err != nil {
			return err
		}
		if p.Opcode() != opLoginReq {
			return fmt.Errorf("opcode %#x during login", p.Opcode())
		}
	}
}

func contains(list []string, s string) bool {
	for _, l := range list {
		if strings.TrimSpace(l) == s {
			return true
		}
	}
	return false
}

// chapOK checks CHAP_R = MD5(id || secret || challenge) (RFC 1994).
func chapOK(user, resp, wantUser, secret string, id byte, challenge []byte) bool {
	if user != wantUser {
		return false
	}
	got, err := hex.DecodeString(strings.TrimPrefix(strings.TrimPrefix(resp, "0x"), "0X"))
	if err != nil {
		return false
	}
	h := md5.New()
	h.Write([]byte{id})
	h.Write([]byte(secret))
	h.Write(challenge)
	// In constant time: how much of a guess matched must not show.
	return subtle.ConstantTimeCompare(h.Sum(nil), got) == 1
}

func (sc *session) loginFail(p *PDU, status uint16, why string) error {
	resp := &PDU{}
	resp.BHS[0] = opLoginResp
	copy(resp.BHS[8:14], p.BHS[8:14])
	resp.put32(16, p.ITT())
	sc.stamp(resp, true)
	resp.BHS[36], resp.BHS[37] = byte(status>>8), byte(status)
	sc.send(resp)
	sc.w.Flush()
	sc.s.emit(timeline.Event{Kind: "login-failed", Addr: sc.ip, Msg: why,
		Detail: map[string]any{"target": sc.target, "initiator": sc.initiator, "status": fmt.Sprintf("%#04x", status)}})
	sc.target = "" // nothing to report at close
	return errors.New("iscsi login failed: " + why)
}

// negotiate answers operational keys (RFC 7143 section 13).
func (sc *session) negotiate(keys map[string]string, replied map[string]bool) [][2]string {
	var out [][2]string
	num := func(k string, def int) int {
		if v, err := strconv.Atoi(keys[k]); err == nil {
			return v
		}
		return def
	}
	for _, k := range []string{"HeaderDigest", "DataDigest", "MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength",
		"InitialR2T", "ImmediateData", "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "DefaultTime2Wait",
		"DefaultTime2Retain", "ErrorRecoveryLevel", "MaxConnections", "IFMarker", "OFMarker"} {
		v, asked := keys[k]
		if !asked || replied[k] {
			continue
		}
		replied[k] = true
		switch k {
		case "HeaderDigest", "DataDigest":
			out = append(out, [2]string{k, "None"})
		case "MaxRecvDataSegmentLength":
			sc.maxSend = max(512, min(num(k, 8192), 1<<24-1)) // RFC 7143 13.12
			out = append(out, [2]string{k, strconv.Itoa(maxRecvData)})
		case "MaxBurstLength":
			sc.maxBurst = max(512, min(num(k, 262144), 1<<20)) // RFC 7143: 512 and up
			out = append(out, [2]string{k, strconv.Itoa(sc.maxBurst)})
		case "FirstBurstLength":
			sc.firstBurst = max(512, min(num(k, 65536), 1<<20))
			out = append(out, [2]string{k, strconv.Itoa(sc.firstBurst)})
		case "InitialR2T":
			out = append(out, [2]string{k, "Yes"})
		case "ImmediateData":
			// A boolean "and" (RFC 7143 13.11): the result is No unless
			// both say Yes.
			sc.immediateData = v == "Yes"
			out = append(out, [2]string{k, map[bool]string{true: "Yes", false: "No"}[sc.immediateData]})
		case "MaxOutstandingR2T", "MaxConnections":
			out = append(out, [2]string{k, "1"})
		case "DataPDUInOrder", "DataSequenceInOrder":
			out = append(out, [2]string{k, "Yes"})
		case "DefaultTime2Wait":
			out = append(out, [2]string{k, "2"})
		case "DefaultTime2Retain", "ErrorRecoveryLevel":
			out = append(out, [2]string{k, "0"})
		case "IFMarker", "OFMarker":
			out = append(out, [2]string{k, "No"})
		}
	}
	return out
}

func (s *Server) lookup(iqn, ip string) (export, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.exports[iqn][ip]
	return e, ok
}

// LUN is a file-backed logical unit of 512-byte blocks.
type LUN struct {
	f      *os.File
	blocks uint64
	serial string
}

// BlockSize is the logical block size of every LUN.
const BlockSize = 512

// OpenLUN opens path (read-write) as a LUN.
func OpenLUN(path, serial string) (*LUN, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("iscsi: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("iscsi: %w", err)
	}
	if fi.Size() < BlockSize {
		f.Close()
		return nil, fmt.Errorf("iscsi: %s is smaller than one block", path)
	}
	return &LUN{f: f, blocks: uint64(fi.Size()) / BlockSize, serial: serial}, nil
}

// Close closes the LUN's file.
func (l *LUN) Close() error { return l.f.Close() }

// portal is the target's address for SendTargets: the one the initiator
// came to (IPv4 or IPv6), else the configured one.
func (sc *session) portal() string {
	host := sc.s.addr
	if h := hostOf(sc.c.LocalAddr()); h != "" && h != "0.0.0.0" && h != "::" {
		host = h
	}
	return net.JoinHostPort(host, fmt.Sprint(Port)) + ",1"
}
