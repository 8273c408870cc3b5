package iscsi

import (
	"bufio"
	"bytes"
	"crypto/md5"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/timeline"
)

// initiator is a minimal in-process iSCSI initiator for unit tests; the
// scenarios use the Linux kernel's.
type initiator struct {
	t      *testing.T
	c      net.Conn
	r      *bufio.Reader
	itt    uint32
	cmdSN  uint32
	maxRec int
}

func dial(t *testing.T, addr string) *initiator {
	c, err := net.Dial("tcp", addr)
	assert.NilError(t, err)
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return &initiator{t: t, c: c, r: bufio.NewReader(c), cmdSN: 1, maxRec: 8192}
}

func (in *initiator) roundTrip(p *PDU) *PDU {
	_, err := in.c.Write(p.Bytes())
	assert.NilError(in.t, err)
	r, err := ReadPDU(in.r)
	assert.NilError(in.t, err)
	return r
}

func (in *initiator) loginPDU(csg, nsg int, transit bool, kv ...string) *PDU {
	var pairs [][2]string
	for i := 0; i+1 < len(kv); i += 2 {
		pairs = append(pairs, [2]string{kv[i], kv[i+1]})
	}
	p := &PDU{Data: EncodeText(pairs)}
	p.BHS[0] = opLoginReq | flagImmediate
	p.BHS[1] = byte(csg<<2 | nsg)
	if transit {
		p.BHS[1] |= 0x80
	}
	copy(p.BHS[8:14], []byte{0x40, 0, 0, 1, 0, 0})
	in.itt++
	p.put32(16, in.itt)
	p.put32(24, in.cmdSN)
	return p
}

func status(p *PDU) uint16 { return uint16(p.BHS[36])<<8 | uint16(p.BHS[37]) }

func text(p *PDU) map[string]string {
	kv, _ := ParseText(p.Data)
	m := map[string]string{}
	for _, k := range kv {
		m[k[0]] = k[1]
	}
	return m
}

// login runs security (None or CHAP) and operational stages.
func (in *initiator) login(target string, chap *CHAP) uint16 {
	names := []string{"InitiatorName", "iqn.2026-11.dev.nbh:test", "TargetName", target, "SessionType", "Normal"}
	if chap == nil {
		r := in.roundTrip(in.loginPDU(0, 1, true, append(names, "AuthMethod", "None")...))
		if status(r) != 0 {
			return status(r)
		}
	} else {
		r := in.roundTrip(in.loginPDU(0, 1, false, append(names, "AuthMethod", "CHAP,None")...))
		if status(r) != 0 {
			return status(r)
		}
		assert.Equal(in.t, text(r)["AuthMethod"], "CHAP")
		r = in.roundTrip(in.loginPDU(0, 1, false, "CHAP_A", "5"))
		m := text(r)
		id, _ := strconv.Atoi(m["CHAP_I"])
		ch, _ := hex.DecodeString(strings.TrimPrefix(m["CHAP_C"], "0x"))
		h := md5.New()
		h.Write([]byte{byte(id)})
		h.Write([]byte(chap.Secret))
		h.Write(ch)
		r = in.roundTrip(in.loginPDU(0, 1, true, "CHAP_N", chap.User, "CHAP_R", "0x"+hex.EncodeToString(h.Sum(nil))))
		if status(r) != 0 {
			return status(r)
		}
	}
	r := in.roundTrip(in.loginPDU(1, 3, true, "HeaderDigest", "None", "DataDigest", "None",
		"MaxRecvDataSegmentLength", "8192", "MaxBurstLength", "16384", "FirstBurstLength", "4096",
		"ImmediateData", "Yes", "InitialR2T", "Yes", "Frobnicate", "Yes"))
	if status(r) == 0 {
		assert.Equal(in.t, r.BHS[1]&0x83, byte(0x83), "no transit to full feature phase")
		assert.Assert(in.t, binary.BigEndian.Uint16(r.BHS[14:]) != 0, "no TSIH")
		assert.Equal(in.t, text(r)["MaxBurstLength"], "16384")
	}
	return status(r)
}

func (in *initiator) cmd(cdb []byte, read int, write []byte) (status byte, data []byte, sense []byte) {
	p := &PDU{}
	p.BHS[0] = opSCSICmd
	p.BHS[1] = flagFinal
	if read > 0 {
		p.BHS[1] |= 0x40
		p.put32(20, uint32(read))
	}
	if write != nil {
		p.BHS[1] |= 0x20
		p.put32(20, uint32(len(write)))
		p.Data = write[:min(len(write), 4096)] // immediate data, up to FirstBurstLength
	}
	in.itt++
	p.put32(16, in.itt)
	p.put32(24, in.cmdSN)
	in.cmdSN++
	copy(p.BHS[32:], cdb)
	_, err := in.c.Write(p.Bytes())
	assert.NilError(in.t, err)
	for {
		r, err := ReadPDU(in.r)
		assert.NilError(in.t, err)
		switch r.Opcode() {
		case opDataIn:
			data = append(data, r.Data...)
			if r.Flags()&0x01 != 0 {
				return r.BHS[3], data, nil
			}
		case opR2T:
			off, n := int(r.u32(40)), int(r.u32(44))
			for sent := 0; sent < n; {
				chunk := min(n-sent, 8192)
				d := &PDU{Data: write[off+sent : off+sent+chunk]}
				d.BHS[0] = opDataOut
				if sent+chunk == n {
					d.BHS[1] = flagFinal
				}
				d.put32(16, in.itt)
				d.put32(20, r.u32(20))
				d.put32(40, uint32(off+sent))
				in.c.Write(d.Bytes())
				sent += chunk
			}
		case opSCSIResp:
			if len(r.Data) > 2 {
				sense = r.Data[2:]
			}
			return r.BHS[3], data, sense
		default:
			in.t.Fatalf("unexpected opcode %#x", r.Opcode())
		}
	}
}

func newTarget(t *testing.T) (*Server, string, string) {
	img := filepath.Join(t.TempDir(), "lun.img")
	assert.NilError(t, os.WriteFile(img, make([]byte, 1<<20), 0o644))
	lun, err := OpenLUN(img, "serial0001")
	assert.NilError(t, err)
	t.Cleanup(func() { lun.Close() })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assert.NilError(t, err)
	s := Serve(ln, "127.0.0.1", timeline.New())
	t.Cleanup(func() { s.Close() })
	s.Export("iqn.2026-11.dev.nbh:root", "127.0.0.1", lun, nil)
	s.Export("iqn.2026-11.dev.nbh:secret", "127.0.0.1", lun, &CHAP{User: "u", Secret: "s3cret-s3cret"})
	return s, ln.Addr().String(), img
}

func TestLoginAndSCSI(t *testing.T) {
	_, addr, img := newTarget(t)
	in := dial(t, addr)
	assert.Equal(t, in.login("iqn.2026-11.dev.nbh:root", nil), uint16(0))

	st, inq, _ := in.cmd([]byte{0x12, 0, 0, 0, 255, 0}, 255, nil)
	assert.Equal(t, st, byte(statusGood))
	assert.Equal(t, string(inq[8:16]), "NBH     ")
	_, vpd, _ := in.cmd([]byte{0x12, 1, 0x83, 0, 255, 0}, 255, nil)
	assert.Assert(t, bytes.Contains(vpd, []byte("serial0001")))
	_, capa, _ := in.cmd([]byte{0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0}, 8, nil)
	assert.Equal(t, binary.BigEndian.Uint32(capa), uint32(2047))
	assert.Equal(t, binary.BigEndian.Uint32(capa[4:]), uint32(512))

	// A 40 KiB write: immediate data, then R2Ts in 16 KiB bursts.
	data := bytes.Repeat([]byte("nbh!"), 10240)
	st, _, _ = in.cmd([]byte{0x2a, 0, 0, 0, 0, 8, 0, 0, 80, 0}, 0, data)
	assert.Equal(t, st, byte(statusGood))
	st, back, _ := in.cmd([]byte{0x28, 0, 0, 0, 0, 8, 0, 0, 80, 0}, len(data), nil)
	assert.Equal(t, st, byte(statusGood))
	assert.Assert(t, bytes.Equal(back, data))
	disk, _ := os.ReadFile(img)
	assert.Assert(t, bytes.Equal(disk[8*512:8*512+len(data)], data))

	// Past the end, and an unknown opcode: CHECK CONDITION, ILLEGAL REQUEST.
	st, _, sense := in.cmd([]byte{0x28, 0, 0, 0, 0x08, 0, 0, 0, 1, 0}, 512, nil)
	assert.Equal(t, st, byte(statusCheckCondition))
	assert.Equal(t, sense[2], byte(senseIllegalRequest))
	assert.Equal(t, sense[12], byte(0x21))
	st, _, sense = in.cmd([]byte{0xee}, 0, nil)
	assert.Equal(t, st, byte(statusCheckCondition))
	assert.Equal(t, sense[12], byte(0x20))

	// NOP-Out is echoed; logout is answered.
	nop := &PDU{Data: []byte("ping")}
	nop.BHS[0], nop.BHS[1] = opNOPOut|flagImmediate, flagFinal
	nop.put32(16, 77)
	nop.put32(20, 0xffffffff)
	r := in.roundTrip(nop)
	assert.Equal(t, r.Opcode(), byte(opNOPIn))
	assert.Equal(t, string(r.Data), "ping")
	lo := &PDU{}
	lo.BHS[0], lo.BHS[1] = opLogoutReq|flagImmediate, flagFinal
	r = in.roundTrip(lo)
	assert.Equal(t, r.Opcode(), byte(opLogoutResp))
}

func TestLoginFailures(t *testing.T) {
	_, addr, _ := newTarget(t)
	assert.Equal(t, dial(t, addr).login("iqn.2026-11.dev.nbh:nope", nil), uint16(loginNotFound))
	assert.Equal(t, dial(t, addr).login("iqn.2026-11.dev.nbh:secret", nil), uint16(loginAuthFailed))
	assert.Equal(t, dial(t, addr).login("iqn.2026-11.dev.nbh:secret", &CHAP{User: "u", Secret: "wrong-secret"}), uint16(loginAuthFailed))
	assert.Equal(t, dial(t, addr).login("iqn.2026-11.dev.nbh:secret", &CHAP{User: "u", Secret: "s3cret-s3cret"}), uint16(0))
}

func TestDiscovery(t *testing.T) {
	_, addr, _ := newTarget(t)
	in := dial(t, addr)
	r := in.roundTrip(in.loginPDU(0, 3, true, "InitiatorName", "iqn.x", "SessionType", "Discovery", "AuthMethod", "None"))
	assert.Equal(t, status(r), uint16(0))
	tp := &PDU{Data: EncodeText([][2]string{{"SendTargets", "All"}})}
	tp.BHS[0], tp.BHS[1] = opTextReq, flagFinal
	tp.put32(16, 9)
	tp.put32(20, 0xffffffff)
	r = in.roundTrip(tp)
	assert.Assert(t, strings.Contains(string(r.Data), "TargetName=iqn.2026-11.dev.nbh:root"))
	assert.Assert(t, strings.Contains(string(r.Data), "TargetAddress=127.0.0.1:3260,1"))
}

// A discovery session has no LUN: a SCSI command or task management there
// is rejected, and the session (and the target) go on.
func TestDiscoverySessionRefusesSCSI(t *testing.T) {
	_, addr, _ := newTarget(t)
	in := dial(t, addr)
	r := in.roundTrip(in.loginPDU(0, 3, true, "InitiatorName", "iqn.x", "SessionType", "Discovery", "AuthMethod", "None"))
	assert.Equal(t, status(r), uint16(0))
	for _, op := range []byte{opSCSICmd, opTMFReq, opDataOut} {
		p := &PDU{}
		p.BHS[0], p.BHS[1] = op, flagFinal
		p.put32(16, 7)
		p.BHS[32] = 0x12 // INQUIRY, for the SCSI command
		r = in.roundTrip(p)
		assert.Equal(t, r.Opcode(), byte(opReject), "opcode %#x", op)
	}
	tp := &PDU{Data: EncodeText([][2]string{{"SendTargets", "All"}})}
	tp.BHS[0], tp.BHS[1] = opTextReq, flagFinal
	tp.put32(16, 9)
	tp.put32(20, 0xffffffff)
	r = in.roundTrip(tp)
	assert.Assert(t, strings.Contains(string(r.Data), "TargetName="), "the session did not go on")
}

func FuzzReadPDU(f *testing.F) {
	p := &PDU{Data: []byte("InitiatorName=x\x00")}
	p.BHS[0] = opLoginReq
	f.Add(p.Bytes())
	f.Fuzz(func(t *testing.T, b []byte) {
		q, err := ReadPDU(bytes.NewReader(b))
		if err == nil {
			ParseText(q.Data)
		}
	})
}

// FuzzSession feeds a whole connection's worth of bytes to a target
// session (after a good login, so full-feature PDUs are reached): whatever
// arrives, the target answers or hangs up, and never panics.
func FuzzSession(f *testing.F) {
	cmd := &PDU{}
	cmd.BHS[0], cmd.BHS[1] = opSCSICmd, flagFinal|0x40
	cmd.put32(20, 512)
	copy(cmd.BHS[32:], []byte{0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0})
	f.Add(cmd.Bytes())
	w := &PDU{Data: []byte("abcd")}
	w.BHS[0], w.BHS[1] = opSCSICmd, flagFinal|0x20
	w.put32(20, 1024)
	copy(w.BHS[32:], []byte{0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0})
	f.Add(w.Bytes())
	img := filepath.Join(f.TempDir(), "lun.img")
	os.WriteFile(img, make([]byte, 64<<10), 0o644)
	lun, err := OpenLUN(img, "fuzz")
	if err != nil {
		f.Fatal(err)
	}
	s := &Server{tl: timeline.New(), exports: map[string]map[string]export{"iqn.t": {"pipe": {lun: lun}}}}
	login := func() []byte {
		p := &PDU{Data: EncodeText([][2]string{{"InitiatorName", "iqn.i"}, {"TargetName", "iqn.t"}, {"AuthMethod", "None"}})}
		p.BHS[0], p.BHS[1] = opLoginReq|flagImmediate, 0x80|0x03
		return p.Bytes()
	}()
	f.Fuzz(func(t *testing.T, b []byte) {
		client, server := net.Pipe()
		sc := &session{s: s, c: server, w: bufio.NewWriter(server), ip: "pipe", maxSend: 8192, maxBurst: 262144, firstBurst: 65536, tasks: map[uint32]*task{}}
		done := make(chan struct{})
		go func() {
			defer close(done)
			sc.run()
			server.Close()
		}()
		go io.Copy(io.Discard, client)
		client.Write(login)
		client.Write(b)
		client.Close()
		<-done
	})
}

// Negotiation answers what RFC 7143 says: ImmediateData is a boolean "and"
// (No when the initiator offers No), and burst lengths stay in range
// whatever the initiator offers.
func TestNegotiation(t *testing.T) {
	for _, c := range []struct {
		offer, want string
		immediate   bool
	}{{"Yes", "Yes", true}, {"No", "No", false}, {"Maybe", "No", false}} {
		sc := &session{}
		out := sc.negotiate(map[string]string{"ImmediateData": c.offer}, map[string]bool{})
		assert.DeepEqual(t, out, [][2]string{{"ImmediateData", c.want}})
		assert.Equal(t, sc.immediateData, c.immediate)
	}
	sc := &session{}
	sc.negotiate(map[string]string{"MaxBurstLength": "-5", "FirstBurstLength": "99999999"}, map[string]bool{})
	assert.Equal(t, sc.maxBurst, 512)
	assert.Equal(t, sc.firstBurst, 1<<20)
}

// Task management does what it says: ABORT TASK of a write waiting for its
// data ends that write (its data is then refused), of a finished command
// says "task does not exist"; a LUN reset is function complete.
func TestTaskManagementAborts(t *testing.T) {
	_, addr, _ := newTarget(t)
	in := dial(t, addr)
	assert.Equal(t, in.login("iqn.2026-11.dev.nbh:root", nil), uint16(0))
	// A 40 KiB write without its data: the target asks for it (R2T).
	w := &PDU{}
	w.BHS[0], w.BHS[1] = opSCSICmd, flagFinal|0x20
	w.put32(16, 500)
	w.put32(20, 40960)
	w.put32(24, in.cmdSN)
	in.cmdSN++
	copy(w.BHS[32:], []byte{0x2a, 0, 0, 0, 0, 8, 0, 0, 80, 0})
	r := in.roundTrip(w)
	assert.Equal(t, r.Opcode(), byte(opR2T))
	ttt := r.u32(20)
	tmf := func(fn byte, ref uint32) byte {
		p := &PDU{}
		p.BHS[0], p.BHS[1] = opTMFReq|flagImmediate, 0x80|fn
		p.put32(16, 600+uint32(fn))
		p.put32(20, ref)
		p.put32(24, in.cmdSN)
		r := in.roundTrip(p)
		assert.Equal(t, r.Opcode(), byte(opTMFResp))
		return r.BHS[2]
	}
	assert.Equal(t, tmf(1, 500), byte(0), "abort of the waiting write")
	assert.Equal(t, tmf(1, 500), byte(1), "abort of a task that no longer exists")
	assert.Equal(t, tmf(5, 0), byte(0), "LUN reset")
	assert.Equal(t, tmf(8, 0), byte(5), "task reassignment is not supported")
	// The aborted write's data is refused: the session ends.
	d := &PDU{Data: make([]byte, 512)}
	d.BHS[0], d.BHS[1] = opDataOut, flagFinal
	d.put32(16, 500)
	d.put32(20, ttt)
	in.c.Write(d.Bytes())
	_, err := ReadPDU(in.r)
	assert.Assert(t, err != nil, "data for an aborted write was taken")
}

// A login PDU that claims more data than a login may carry is refused
// before the target reads or allocates it: the connection ends at once.
func TestOversizeLoginIsRefusedAtOnce(t *testing.T) {
	_, addr, _ := newTarget(t)
	in := dial(t, addr)
	p := in.loginPDU(0, 3, true)
	b := p.Bytes()
	b[5], b[6], b[7] = 0xff, 0xff, 0xff
	_, err := in.c.Write(b[:48])
	assert.NilError(t, err)
	in.c.SetReadDeadline(time.Now().Add(3 * time.Second))
	_, err = ReadPDU(in.r)
	var ne net.Error
	assert.Assert(t, err != nil && !(errors.As(err, &ne) && ne.Timeout()), "the target waited for 16 MiB: %v", err)
}

// TestSessionMemoryIsBounded: writes that never send their data hold no
// more than the session's bound (the ones past it are answered TASK SET
// FULL, and the session goes on), and a read of a whole large LUN is sent
// as it is read, not gathered in memory first.
func TestSessionMemoryIsBounded(t *testing.T) {
	img := filepath.Join(t.TempDir(), "lun.img")
	f, err := os.Create(img)
	assert.NilError(t, err)
	assert.NilError(t, f.Truncate(256<<20)) // sparse
	f.Close()
	lun, err := OpenLUN(img, "serial0002")
	assert.NilError(t, err)
	defer lun.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assert.NilError(t, err)
	s := Serve(ln, "127.0.0.1", timeline.New())
	defer s.Close()
	s.Export("iqn.2026-11.dev.nbh:big", "127.0.0.1", lun, nil)
	in := dial(t, ln.Addr().String())
	assert.Equal(t, in.login("iqn.2026-11.dev.nbh:big", nil), uint16(0))

	// 16 MiB writes without their data: 2 fit in 32 MiB, the 3rd is
	// TASK SET FULL.
	var statuses []byte
	for i := range 6 {
		w := &PDU{}
		w.BHS[0], w.BHS[1] = opSCSICmd, flagFinal|0x20
		w.put32(16, uint32(900+i))
		w.put32(20, 16<<20)
		w.put32(24, in.cmdSN)
		in.cmdSN++
		copy(w.BHS[32:], []byte{0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0})
		r := in.roundTrip(w)
		if r.Opcode() == opR2T {
			statuses = append(statuses, 0)
		} else {
			assert.Equal(t, r.Opcode(), byte(opSCSIResp))
			statuses = append(statuses, r.BHS[3])
		}
	}
	assert.DeepEqual(t, statuses, []byte{0, 0, statusTaskSetFull, statusTaskSetFull, statusTaskSetFull, statusTaskSetFull})
	// They are let go (ABORT TASK SET), and their buffers with them.
	tmf := &PDU{}
	tmf.BHS[0], tmf.BHS[1] = opTMFReq|flagImmediate, 0x80|2
	tmf.put32(16, 950)
	tmf.put32(24, in.cmdSN)
	assert.Equal(t, in.roundTrip(tmf).BHS[2], byte(0))
	runtime.GC()

	// The session still works: a read of the whole LUN (READ(16) of
	// 256 MiB), its data counted and dropped as it comes, while the
	// test samples the process's heap: a target that gathered the read
	// whole would hold 256 MiB for the seconds it takes to send.
	var peak atomic.Uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			var m runtime.MemStats
			runtime.ReadMemStats(&m)
			if m.HeapAlloc > peak.Load() {
				peak.Store(m.HeapAlloc)
			}
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	p := &PDU{}
	p.BHS[0], p.BHS[1] = opSCSICmd, flagFinal|0x40
	p.put32(16, 999)
	p.put32(20, 256<<20)
	p.put32(24, in.cmdSN)
	in.cmdSN++
	copy(p.BHS[32:], []byte{0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0})
	_, err = in.c.Write(p.Bytes())
	assert.NilError(t, err)
	got := 0
	for {
		r, err := ReadPDU(in.r)
		assert.NilError(t, err)
		assert.Equal(t, r.Opcode(), byte(opDataIn))
		got += len(r.Data)
		if r.Flags()&0x01 != 0 {
			assert.Equal(t, r.BHS[3], byte(statusGood))
			break
		}
	}
	close(stop)
	<-sampled
	assert.Equal(t, got, 256<<20)
	assert.Assert(t, peak.Load() < 128<<20, "the heap reached %d MiB during a 256 MiB read", peak.Load()>>20)

	// A read that expects nothing is answered (with its residual).
	st, _, _ := in.cmd([]byte{0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0}, 0, nil)
	assert.Equal(t, st, byte(statusGood))

	// One initiator address holds at most MaxPerGuest connections: the
	// one past them is closed at once (the first is the test's session).
	var extra []net.Conn
	for range MaxPerGuest - 1 {
		c, err := net.Dial("tcp", ln.Addr().String())
		assert.NilError(t, err)
		extra = append(extra, c)
		defer c.Close()
	}
	over, err := net.Dial("tcp", ln.Addr().String())
	assert.NilError(t, err)
	defer over.Close()
	over.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = over.Read(make([]byte, 1))
	assert.Assert(t, err == io.EOF, "the connection past the bound was kept: %v", err)
	// The ones within it are kept.
	extra[0].SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	_, err = extra[0].Read(make([]byte, 1))
	assert.Assert(t, errors.Is(err, os.ErrDeadlineExceeded), "a connection within the bound was cut: %v", err)
}
