package netfab

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// pcapng writes Ethernet frames as a pcapng stream (one section, one
// interface, enhanced packet blocks with microsecond timestamps).
type pcapng struct {
	mu  sync.Mutex
	w   io.Writer
	err error // the first write error
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

// write records frame at t: inbound, as the guest received it, or
// outbound, as it sent it (the packet's epb_flags, which Wireshark shows
// as its direction), whether the switch let it through or not.
func (p *pcapng) write(t time.Time, frame []byte, inbound bool) {
	le := binary.LittleEndian
	pad := (4 - len(frame)%4) % 4
	const opts = 12 // epb_flags (4 + 4), opt_endofopt (4)
	total := 32 + len(frame) + pad + opts
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
	o := 28 + len(frame) + pad
	le.PutUint16(b[o:], 2) // epb_flags
	le.PutUint16(b[o+2:], 4)
	dir := uint32(2) // outbound
	if inbound {
		dir = 1
	}
	le.PutUint32(b[o+4:], dir)
	le.PutUint32(b[total-4:], uint32(total))
	p.mu.Lock()
	if p.err == nil {
		// The first failure (a full disk) is kept and reported when the
		// port closes: the capture is incomplete from there.
		_, p.err = p.w.Write(b)
	}
	p.mu.Unlock()
}

// Frame is one captured frame.
type Frame struct {
	Time    time.Time
	Data    []byte
	Inbound bool // the guest received it (else it sent it)
}

// ReadCapture reads a capture this package wrote (a guest's network.pcapng),
// so tests can assert on what a guest sent and got.
func ReadCapture(path string) ([]Frame, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	var out []Frame
	for off := 0; off+12 <= len(b); {
		typ, n := le.Uint32(b[off:]), int(le.Uint32(b[off+4:]))
		if n < 12 || off+n > len(b) {
			return out, fmt.Errorf("netfab: %s: bad block at offset %d", path, off)
		}
		if typ == 6 && n >= 32 {
			caplen := int(le.Uint32(b[off+20:]))
			if 28+caplen > n {
				return out, fmt.Errorf("netfab: %s: bad packet block at offset %d", path, off)
			}
			us := uint64(le.Uint32(b[off+12:]))<<32 | uint64(le.Uint32(b[off+16:]))
			f := Frame{Time: time.UnixMicro(int64(us)), Data: b[off+28 : off+28+caplen]}
			// Options follow the padded packet: epb_flags gives the direction.
			for o := off + 28 + caplen + (4-caplen%4)%4; o+4 <= off+n-4; {
				code, l := le.Uint16(b[o:]), int(le.Uint16(b[o+2:]))
				if code == 0 {
					break
				}
				if code == 2 && l == 4 && o+8 <= off+n {
					f.Inbound = le.Uint32(b[o+4:])&3 == 1
				}
				o += 4 + l + (4-l%4)%4
			}
			out = append(out, f)
		}
		off += n
	}
	return out, nil
}
