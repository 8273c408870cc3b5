package iscsi

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"

	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/internal/rules"
)

// SCSI status and sense keys.
const (
	statusGood           = 0x00
	statusCheckCondition = 0x02

	senseIllegalRequest = 0x05
	senseMediumError    = 0x03
)

type checkCondition struct{ key, asc, ascq byte }

func (c checkCondition) Error() string {
	return fmt.Sprintf("check condition: key %#x asc %#x ascq %#x", c.key, c.asc, c.ascq)
}

var (
	errInvalidOpcode = checkCondition{senseIllegalRequest, 0x20, 0x00}
	errInvalidField  = checkCondition{senseIllegalRequest, 0x24, 0x00}
	errLBARange      = checkCondition{senseIllegalRequest, 0x21, 0x00}
)

// A session's memory is bounded: the writes waiting for their data hold
// at most maxPendingBytes of buffers in all (maxPendingWrites of them), a
// new one past that is answered TASK SET FULL (the initiator retries
// later, with fewer at once), and a read is sent from the LUN as it is
// read, one PDU's worth at a time, never whole.
const (
	maxPendingWrites = 16
	maxPendingBytes  = 32 << 20
	maxWrite         = maxPendingBytes // one command's data: more is CHECK CONDITION, never TASK SET FULL for ever
)

// statusTaskSetFull is SAM's TASK SET FULL: try again with fewer commands.
const statusTaskSetFull = 0x28

// scsi runs a SCSI Command PDU.
func (sc *session) scsi(p *PDU) error {
	cdb := append([]byte(nil), p.BHS[32:48]...)
	expected := int(p.u32(20))
	write := p.Flags()&0x20 != 0
	if write {
		if expected > maxWrite {
			return sc.respond(p.ITT(), statusCheckCondition, errInvalidField, 0)
		}
		if (len(sc.tasks) >= maxPendingWrites || sc.pending+expected > maxPendingBytes) && rules.On(rules.ISCSIMemory) {
			sc.s.emit(timeline.Event{Kind: "task-set-full", Addr: sc.ip,
				Msg: fmt.Sprintf("a write of %d bytes while %d writes (%d bytes) wait for their data: TASK SET FULL", expected, len(sc.tasks), sc.pending)})
			return sc.respond(p.ITT(), statusTaskSetFull, nil, 0)
		}
		t := &task{itt: p.ITT(), cdb: cdb, buf: make([]byte, expected)}
		t.got = copy(t.buf, p.Data)
		if t.got == expected {
			return sc.finishWrite(t)
		}
		sc.nextTTT++
		t.ttt = sc.nextTTT
		sc.tasks[t.ttt] = t
		sc.pending += expected
		return sc.r2t(t)
	}
	if off, n, ok, err := sc.lunRead(cdb); ok {
		if err != nil {
			return sc.respond(p.ITT(), statusCheckCondition, err, 0)
		}
		sc.checkRead10(cdb, int(n), expected)
		n = min(n, int64(expected))
		if n == 0 {
			return sc.respond(p.ITT(), statusGood, nil, expected)
		}
		sc.readBytes += n
		if !rules.On(rules.ISCSIMemory) {
			whole := make([]byte, n) // gathered whole
			sc.lun.f.ReadAt(whole, off)
			return sc.dataIn(p.ITT(), io.NewSectionReader(bytes.NewReader(whole), 0, n), expected)
		}
		return sc.dataIn(p.ITT(), io.NewSectionReader(sc.lun.f, off, n), expected)
	}
	data, err := sc.exec(cdb, nil)
	if err != nil {
		cc, ok := err.(checkCondition)
		if !ok {
			cc = checkCondition{senseMediumError, 0x11, 0x00} // unrecovered read error
		}
		return sc.respond(p.ITT(), statusCheckCondition, cc, 0)
	}
	if len(data) > expected {
		data = data[:expected]
	}
	if len(data) == 0 {
		return sc.respond(p.ITT(), statusGood, nil, expected)
	}
	return sc.dataIn(p.ITT(), io.NewSectionReader(bytes.NewReader(data), 0, int64(len(data))), expected)
}

// checkRead10 records a READ(10) whose initiator wants more than its
// 16-bit block count can say and sent the count cut to 16 bits: it gets the
// residual (underflow) and, if it ignores that, garbage past what came.
func (sc *session) checkRead10(cdb []byte, n, expected int) {
	if cdb[0] == 0x28 && expected > n && expected/BlockSize > 0xffff {
		sc.s.emit(timeline.Event{Kind: "read10-overflow", Addr: sc.ip,
			Msg: fmt.Sprintf("READ(10) of %d blocks, but the initiator expects %d bytes (%d blocks): the count did not fit READ(10)'s 16 bits", n/BlockSize, expected, expected/BlockSize)})
	}
}

// lunRead reads a READ(10) or READ(16) command: the span of the LUN it
// asks for (ok: it is one), or why it cannot be read.
func (sc *session) lunRead(cdb []byte) (off, n int64, ok bool, err error) {
	be := binary.BigEndian
	var lba uint64
	var blocks uint32
	switch cdb[0] {
	case 0x28:
		lba, blocks = uint64(be.Uint32(cdb[2:])), uint32(be.Uint16(cdb[7:]))
	case 0x88:
		lba, blocks = be.Uint64(cdb[2:]), be.Uint32(cdb[10:])
	default:
		return 0, 0, false, nil
	}
	if lba+uint64(blocks) > sc.lun.blocks || lba+uint64(blocks) < lba {
		return 0, 0, true, errLBARange
	}
	return int64(lba) * BlockSize, int64(blocks) * BlockSize, true, nil
}

// r2t asks for the next burst of a write.
func (sc *session) r2t(t *task) error {
	n := min(len(t.buf)-t.got, sc.maxBurst)
	t.burstEnd = t.got + n
	r := &PDU{}
	r.BHS[0], r.BHS[1] = opR2T, flagFinal
	r.put32(16, t.itt)
	r.put32(20, t.ttt)
	sc.stamp(r, false)
	r.put32(36, t.r2tsn)
	r.put32(40, uint32(t.got))
	r.put32(44, uint32(n))
	t.r2tsn++
	return sc.send(r)
}

// dataOut takes solicited write data.
func (sc *session) dataOut(p *PDU) error {
	t, ok := sc.tasks[p.u32(20)]
	if !ok || t.itt != p.ITT() {
		return fmt.Errorf("data-out for unknown transfer tag %#x", p.u32(20))
	}
	off := int(p.u32(40))
	if off < 0 || off+len(p.Data) > len(t.buf) {
		return fmt.Errorf("data-out at %d+%d past a %d-byte write", off, len(p.Data), len(t.buf))
	}
	copy(t.buf[off:], p.Data)
	t.got = max(t.got, off+len(p.Data))
	if p.Flags()&flagFinal == 0 || t.got < t.burstEnd {
		return nil
	}
	if t.got < len(t.buf) {
		return sc.r2t(t)
	}
	delete(sc.tasks, t.ttt)
	sc.pending -= len(t.buf)
	return sc.finishWrite(t)
}

func (sc *session) finishWrite(t *task) error {
	if _, err := sc.exec(t.cdb, t.buf); err != nil {
		cc, ok := err.(checkCondition)
		if !ok {
			cc = checkCondition{senseMediumError, 0x0c, 0x00} // write error
		}
		return sc.respond(t.itt, statusCheckCondition, cc, 0)
	}
	return sc.respond(t.itt, statusGood, nil, 0)
}

// dataIn sends read data in PDUs no larger than the initiator accepts, the
// last one carrying the status (phase collapse).
func (sc *session) dataIn(itt uint32, r *io.SectionReader, expected int) error {
	var sn uint32
	size := int(r.Size())
	buf := make([]byte, min(sc.maxSend, size))
	for off := 0; off < size; {
		n := min(sc.maxSend, size-off)
		if _, err := r.ReadAt(buf[:n], int64(off)); err != nil {
			return err
		}
		last := off+n == size
		p := &PDU{Data: buf[:n]}
		p.BHS[0] = opDataIn
		p.put32(16, itt)
		p.put32(20, 0xffffffff)
		p.put32(36, sn)
		p.put32(40, uint32(off))
		if last {
			p.BHS[1] = flagFinal | 0x01 // F, S
			p.BHS[3] = statusGood
			if under := expected - size; under > 0 {
				p.BHS[1] |= 0x02 // U
				p.put32(44, uint32(under))
			}
			sc.stamp(p, true)
		} else {
			p.put32(28, sc.expCmdSN)
			p.put32(32, sc.expCmdSN+63)
		}
		if err := sc.send(p); err != nil {
			return err
		}
		off += n
		sn++
	}
	return nil
}

// respond sends a SCSI Response, with sense data on CHECK CONDITION.
func (sc *session) respond(itt uint32, status byte, cc error, residual int) error {
	p := &PDU{}
	p.BHS[0], p.BHS[1], p.BHS[3] = opSCSIResp, flagFinal, status
	if residual > 0 {
		p.BHS[1] |= 0x02 // underflow: nothing was sent of what was asked
		p.put32(44, uint32(residual))
	}
	if c, ok := cc.(checkCondition); ok {
		sense := make([]byte, 2+18)
		binary.BigEndian.PutUint16(sense, 18)
		sense[2], sense[4], sense[9] = 0x70, c.key, 10
		sense[14], sense[15] = c.asc, c.ascq
		p.Data = sense
	}
	p.put32(16, itt)
	sc.stamp(p, true)
	return sc.send(p)
}

// exec runs a CDB; out is the write data. It returns read data.
func (sc *session) exec(cdb []byte, out []byte) ([]byte, error) {
	l := sc.lun
	be := binary.BigEndian
	switch cdb[0] {
	case 0x00: // TEST UNIT READY
		return nil, nil
	case 0x03: // REQUEST SENSE
		s := make([]byte, 18)
		s[0], s[7] = 0x70, 10
		return s, nil
	case 0x12: // INQUIRY
		return l.inquiry(cdb)
	case 0x25: // READ CAPACITY(10)
		b := make([]byte, 8)
		last := l.blocks - 1
		if last > 0xffffffff {
			last = 0xffffffff
		}
		be.PutUint32(b, uint32(last))
		be.PutUint32(b[4:], BlockSize)
		return b, nil
	case 0x9e: // SERVICE ACTION IN(16)
		if cdb[1]&0x1f != 0x10 {
			return nil, errInvalidField
		}
		b := make([]byte, 32)
		be.PutUint64(b, l.blocks-1)
		be.PutUint32(b[8:], BlockSize)
		return b, nil
	case 0x1a: // MODE SENSE(6): header only, no block descriptors
		return []byte{3, 0, 0, 0}, nil
	case 0x5a: // MODE SENSE(10)
		return []byte{0, 6, 0, 0, 0, 0, 0, 0}, nil
	case 0xa0: // REPORT LUNS: LUN 0
		return []byte{0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, nil
	case 0x35, 0x91: // SYNCHRONIZE CACHE(10/16)
		return nil, l.f.Sync()
	case 0x2a, 0x8a: // WRITE(10/16); reads are lunRead's
		var lba uint64
		var n uint32
		if cdb[0] == 0x2a {
			lba, n = uint64(be.Uint32(cdb[2:])), uint32(be.Uint16(cdb[7:]))
		} else {
			lba, n = be.Uint64(cdb[2:]), be.Uint32(cdb[10:])
		}
		if lba+uint64(n) > l.blocks || lba+uint64(n) < lba {
			return nil, errLBARange
		}
		off := int64(lba) * BlockSize
		if len(out) != int(n)*BlockSize {
			return nil, errInvalidField
		}
		if _, err := l.f.WriteAt(out, off); err != nil {
			return nil, err
		}
		sc.writeBytes += int64(len(out))
		return nil, nil
	}
	return nil, errInvalidOpcode
}

// inquiry answers standard INQUIRY and the VPD pages 0x00, 0x80 and 0x83.
func (l *LUN) inquiry(cdb []byte) ([]byte, error) {
	if cdb[1]&1 == 0 {
		if cdb[2] != 0 {
			return nil, errInvalidField
		}
		b := make([]byte, 36)
		b[2], b[3], b[4], b[7] = 0x05, 0x02, 31, 0x02 // SPC-3, format 2, CmdQue
		copy(b[8:], "NBH     ")
		copy(b[16:], "LAB DISK        ")
		copy(b[32:], "0001")
		return b, nil
	}
	switch cdb[2] {
	case 0x00:
		return []byte{0, 0x00, 0, 3, 0x00, 0x80, 0x83}, nil
	case 0x80:
		return append([]byte{0, 0x80, 0, byte(len(l.serial))}, l.serial...), nil
	case 0x83:
		id := append([]byte("NBH     "), l.serial...)
		desc := append([]byte{0x02, 0x01, 0, byte(len(id))}, id...) // ASCII, T10 vendor ID
		return append([]byte{0, 0x83, 0, byte(len(desc))}, desc...), nil
	}
	return nil, errInvalidField
}
