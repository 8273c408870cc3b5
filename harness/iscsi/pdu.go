// Package iscsi is the lab's iSCSI target (RFC 7143), in-process, so it runs
// without root, in parallel labs, with protocol-level fault hooks: login with
// text-key negotiation (no authentication, or CHAP), discovery (SendTargets),
// the SCSI commands Linux's disk driver issues, NOP, task management and
// logout, serving file-backed LUNs.
package iscsi

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Opcodes (initiator -> target, and the target's answers).
const (
	opNOPOut      = 0x00
	opSCSICmd     = 0x01
	opTMFReq      = 0x02
	opLoginReq    = 0x03
	opTextReq     = 0x04
	opDataOut     = 0x05
	opLogoutReq   = 0x06
	opNOPIn       = 0x20
	opSCSIResp    = 0x21
	opTMFResp     = 0x22
	opLoginResp   = 0x23
	opTextResp    = 0x24
	opDataIn      = 0x25
	opLogoutResp  = 0x26
	opR2T         = 0x31
	opReject      = 0x3f
	flagFinal     = 0x80
	flagImmediate = 0x40
)

// maxDataSegment bounds what a PDU may carry; larger is a protocol error.
const maxDataSegment = 16 << 20

// PDU is one iSCSI protocol data unit: a 48-byte basic header segment and
// its data segment (additional header segments are read and skipped; no
// digests are negotiated).
type PDU struct {
	BHS  [48]byte
	Data []byte
}

func (p *PDU) Opcode() byte    { return p.BHS[0] & 0x3f }
func (p *PDU) Immediate() bool { return p.BHS[0]&flagImmediate != 0 }
func (p *PDU) Flags() byte     { return p.BHS[1] }
func (p *PDU) ITT() uint32     { return binary.BigEndian.Uint32(p.BHS[16:]) }
func (p *PDU) u32(off int) uint32 {
	return binary.BigEndian.Uint32(p.BHS[off:])
}
func (p *PDU) put32(off int, v uint32) { binary.BigEndian.PutUint32(p.BHS[off:], v) }

// ReadPDU reads one PDU.
func ReadPDU(r io.Reader) (*PDU, error) { return readPDU(r, maxDataSegment) }

// readPDU is ReadPDU refusing a data segment longer than max before reading
// (or allocating) it.
func readPDU(r io.Reader, max int) (*PDU, error) {
	p := &PDU{}
	if _, err := io.ReadFull(r, p.BHS[:]); err != nil {
		return nil, err
	}
	ahs := int(p.BHS[4]) * 4
	dsl := int(p.BHS[5])<<16 | int(p.BHS[6])<<8 | int(p.BHS[7])
	if dsl > max {
		return nil, fmt.Errorf("iscsi: data segment of %d bytes (at most %d here)", dsl, max)
	}
	if ahs > 0 {
		if _, err := io.CopyN(io.Discard, r, int64(ahs)); err != nil {
			return nil, err
		}
	}
	if dsl > 0 {
		padded := (dsl + 3) &^ 3
		buf := make([]byte, padded)
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, err
		}
		p.Data = buf[:dsl]
	}
	return p, nil
}

// Bytes encodes the PDU with its data length set and padding added.
func (p *PDU) Bytes() []byte {
	n := len(p.Data)
	p.BHS[4] = 0
	p.BHS[5], p.BHS[6], p.BHS[7] = byte(n>>16), byte(n>>8), byte(n)
	out := make([]byte, 48+(n+3)&^3)
	copy(out, p.BHS[:])
	copy(out[48:], p.Data)
	return out
}

// ParseText reads key=value pairs of a login or text data segment.
func ParseText(b []byte) ([][2]string, error) {
	var kv [][2]string
	for _, f := range strings.Split(string(b), "\x00") {
		if f == "" {
			continue
		}
		k, v, ok := strings.Cut(f, "=")
		if !ok || k == "" {
			return nil, errors.New("iscsi: malformed text key " + fmt.Sprintf("%q", f))
		}
		kv = append(kv, [2]string{k, v})
	}
	return kv, nil
}

// EncodeText writes key=value pairs.
func EncodeText(kv [][2]string) []byte {
	var b []byte
	for _, p := range kv {
		b = append(append(append(append(b, p[0]...), '='), p[1]...), 0)
	}
	return b
}
