package iscsi

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"nbh.dev/nbh/harness/timeline"
)

// The states a hostile initiator can reach before its bytes are fuzzed:
// nothing sent, a discovery session, a normal login stopped at the CHAP
// challenge (it cannot answer it), and a full-feature session on a LUN.
const (
	stateFresh = iota
	stateDiscovery
	stateMidLogin
	stateFullFeature
	nStates
)

// prefix is what a well-behaved initiator sends to reach state.
func prefix(state int) []byte {
	p := func(csg, nsg int, transit bool, kv ...string) []byte {
		var pairs [][2]string
		for i := 0; i+1 < len(kv); i += 2 {
			pairs = append(pairs, [2]string{kv[i], kv[i+1]})
		}
		q := &PDU{Data: EncodeText(pairs)}
		q.BHS[0], q.BHS[1] = opLoginReq|flagImmediate, byte(csg<<2|nsg)
		if transit {
			q.BHS[1] |= 0x80
		}
		q.put32(24, 1)
		return q.Bytes()
	}
	switch state {
	case stateDiscovery:
		return p(0, 3, true, "InitiatorName", "iqn.i", "SessionType", "Discovery", "AuthMethod", "None")
	case stateMidLogin:
		return append(p(0, 1, false, "InitiatorName", "iqn.i", "TargetName", "iqn.secret", "AuthMethod", "CHAP"),
			p(0, 1, false, "CHAP_A", "5")...)
	case stateFullFeature:
		return p(0, 3, true, "InitiatorName", "iqn.i", "TargetName", "iqn.open", "AuthMethod", "None")
	}
	return nil
}

// FuzzTargetFromEveryState drives the real target over TCP: the first
// byte picks a state, the rest is the hostile initiator's stream. Beyond
// "no panic" it holds that
//   - every reply is a well-formed target PDU (a target opcode, a data
//     segment no longer than the initiator may receive);
//   - a session that never finished a login to a LUN (fresh, discovery,
//     stuck at CHAP) gets no SCSI response, data or R2T, and the LUN is not
//     written;
//   - no session writes past the LUN's end or touches the file next to it;
//   - discovery never names a target exported to another client;
//   - the session ends when the initiator hangs up (no goroutine waits on).
func FuzzTargetFromEveryState(f *testing.F) {
	for st := range nStates {
		f.Add(append([]byte{byte(st)}, prefix(stateFresh)...))
	}
	inq := &PDU{}
	inq.BHS[0], inq.BHS[1] = opSCSICmd, flagFinal|0x40
	inq.put32(20, 255)
	copy(inq.BHS[32:], []byte{0x12, 0, 0, 0, 255, 0})
	write := &PDU{Data: bytes.Repeat([]byte{0xee}, 512)}
	write.BHS[0], write.BHS[1] = opSCSICmd, flagFinal|0x20
	write.put32(20, 1024)
	copy(write.BHS[32:], []byte{0x2a, 0, 0, 0, 0, 0x7f, 0, 0, 2, 0}) // at the LUN's last block: one too many
	text := &PDU{Data: EncodeText([][2]string{{"SendTargets", "All"}})}
	text.BHS[0], text.BHS[1] = opTextReq, flagFinal
	tmf := &PDU{}
	tmf.BHS[0], tmf.BHS[1] = opTMFReq, flagFinal|1
	for st := range nStates {
		for _, p := range []*PDU{inq, write, text, tmf} {
			f.Add(append([]byte{byte(st)}, p.Bytes()...))
		}
	}

	dir := f.TempDir()
	img := filepath.Join(dir, "lun.img")
	next := filepath.Join(dir, "next.img")
	const lunSize = 64 << 10
	if err := os.WriteFile(img, make([]byte, lunSize), 0o644); err != nil {
		f.Fatal(err)
	}
	if err := os.WriteFile(next, []byte("another guest's disk"), 0o644); err != nil {
		f.Fatal(err)
	}
	lun, err := OpenLUN(img, "fuzz")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { lun.Close() })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	s := Serve(ln, "127.0.0.1", timeline.New())
	f.Cleanup(func() { s.Close() })
	s.Export("iqn.open", "127.0.0.1", lun, nil)
	s.Export("iqn.secret", "127.0.0.1", lun, &CHAP{User: "u", Secret: "not-guessable-0123"})
	s.Export("iqn.other", "192.0.2.9", lun, nil)
	sum := func(p string) [32]byte {
		b, _ := os.ReadFile(p)
		return sha256.Sum256(b)
	}
	nextSum := sum(next)

	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) == 0 {
			return
		}
		state := int(b[0]) % nStates
		os.WriteFile(img, make([]byte, lunSize), 0o644)
		before := sum(img)
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		go func() {
			c.Write(prefix(state))
			c.Write(b[1:])
			c.(*net.TCPConn).CloseWrite()
		}()
		r := bufio.NewReader(c)
		loggedIn := state == stateFullFeature
		for {
			p, err := ReadPDU(r)
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) {
				break
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("the session did not end after the initiator hung up")
			}
			if err != nil {
				break // reset by the target: it hung up
			}
			switch op := p.Opcode(); op {
			case opNOPIn, opTMFResp, opTextResp, opLogoutResp, opReject:
			case opLoginResp:
				ffp := p.BHS[1]&0x83 == 0x83 && p.BHS[36] == 0 && p.BHS[37] == 0
				if ffp && state == stateMidLogin {
					t.Fatal("a login stopped at the CHAP challenge reached full feature phase")
				}
				// From nothing, the stream may log in to the open target
				// itself; from discovery it cannot log in again.
				loggedIn = loggedIn || ffp && state == stateFresh
			case opSCSIResp, opDataIn, opR2T:
				if !loggedIn {
					t.Fatalf("state %d: a LUN answered (opcode %#x) on a session that never logged in to it", state, op)
				}
			default:
				t.Fatalf("reply with opcode %#x, not a target's", op)
			}
			if bytes.Contains(p.Data, []byte("iqn.other")) {
				t.Fatalf("discovery named another client's target: %q", p.Data)
			}
		}
		if (state == stateDiscovery || state == stateMidLogin) && sum(img) != before {
			t.Fatalf("state %d: the LUN was written without a login to it", state)
		}
		if fi, err := os.Stat(img); err != nil || fi.Size() != lunSize {
			t.Fatalf("the LUN's size changed: %v %v", fi.Size(), err)
		}
		if sum(next) != nextSum {
			t.Fatal("the file next to the LUN changed")
		}
	})
}
