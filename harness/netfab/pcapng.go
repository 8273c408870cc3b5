package netfab

import (
	"encoding/binary"
	"io"
	"sync"
	"time"
)

// pcapng writes Ethernet frames as a pcapng stream (one section, one
// interface, enhanced packet blocks with microsecond timestamps).
type pcapng struct {
	mu sync.Mutex
	w  io.Writer
}

func newPcapng(w io.Writer) (*pcapng, error) {
	le := binary.LittleEndian
	// Section header block.
	shb := make([]byte, 28)
	le.PutUint32(shb[0:], 0x0A0D0D0A)
	le.PutUint32(shb[4:], 28)
	le.PutUint32(shb[8:], 0x1A2B3C4D)
	le.PutUint16(shb[12:], 1)
	le.PutUint16(shb[14:], 0)
	le.PutUint64(shb[16:], 0xFFFFFFFFFFFFFFFF)
	le.PutUint32(shb[24:], 28)
	// Interface description block: Ethernet, snaplen 0 (unlimited).
	idb := make([]byte, 20)
	le.PutUint32(idb[0:], 1)
	le.PutUint32(idb[4:], 20)
	le.PutUint16(idb[8:], 1)
	le.PutUint32(idb[12:], 0)
	le.PutUint32(idb[16:], 20)
	if _, err := w.Write(append(shb, idb...)); err != nil {
		return nil, err
	}
	return &pcapng{w: w}, nil
}

func (p *pcapng) write(t time.Time, frame []byte) {
	le := binary.LittleEndian
	pad := (4 - len(frame)%4) % 4
	total := 32 + len(frame) + pad
	b := make([]byte, total)
	le.PutUint32(b[0:], 6)
	le.PutUint32(b[4:], uint32(total))
	le.PutUint32(b[8:], 0)
	us := uint64(t.UnixMicro())
	le.PutUint32(b[12:], uint32(us>>32))
	le.PutUint32(b[16:], uint32(us))
	le.PutUint32(b[20:], uint32(len(frame)))
	le.PutUint32(b[24:], uint32(len(frame)))
	copy(b[28:], frame)
	le.PutUint32(b[total-4:], uint32(total))
	p.mu.Lock()
	p.w.Write(b)
	p.mu.Unlock()
}
