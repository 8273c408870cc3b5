// Package efivars edits the variable store of an EDK2 flash file (a VARS
// file): what a user does in the firmware's setup screens, done before the
// first boot. nbh uses it to put a boot order into a guest's copy of AAVMF's
// variables, and Secure Boot's keys and revocations (db, dbx) into a copy
// of OVMF's or AAVMF's.
//
// The store is EDK2's authenticated variable store in a firmware volume
// (MdeModulePkg's VariableFormat.h): a volume header, a store header, then
// variables one after another, each a 60-byte header, its UTF-16 name and
// its data, 4-byte aligned; erased flash reads 0xff. A variable is replaced
// by marking the old copy deleted and appending the new one, as the
// firmware does. Debian's AAVMF_VARS.fd ships all zeros, which the firmware
// formats on its first boot; Format does the same first, for ArmVirtQemu's
// layout.
package efivars

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"unicode/utf16"
)

// GUID is an EFI GUID in its in-memory (mixed-endian) byte order.
type GUID [16]byte

// ParseGUID reads the usual text form, 8BE4DF61-93CA-11D2-AA0D-00E098032B8C.
func ParseGUID(s string) (GUID, error) {
	var g GUID
	var a uint32
	var b, c uint16
	var d [8]byte
	if _, err := fmt.Sscanf(s, "%08x-%04x-%04x-%02x%02x-%02x%02x%02x%02x%02x%02x", &a, &b, &c,
		&d[0], &d[1], &d[2], &d[3], &d[4], &d[5], &d[6], &d[7]); err != nil {
		return g, fmt.Errorf("efivars: GUID %q: %w", s, err)
	}
	binary.LittleEndian.PutUint32(g[0:], a)
	binary.LittleEndian.PutUint16(g[4:], b)
	binary.LittleEndian.PutUint16(g[6:], c)
	copy(g[8:], d[:])
	return g, nil
}

func mustGUID(s string) GUID {
	g, err := ParseGUID(s)
	if err != nil {
		panic(err)
	}
	return g
}

var (
	// globalVariable is EFI_GLOBAL_VARIABLE: Boot####, BootOrder.
	globalVariable = mustGUID("8BE4DF61-93CA-11D2-AA0D-00E098032B8C")

	systemNvDataFv   = mustGUID("FFF12B8D-7696-4C8B-A985-2747075B4F50")
	authenticatedVar = mustGUID("AAF32C78-947B-439A-A180-2E144EC37792")
	ftwWorkingBlock  = mustGUID("9E58292B-7C68-497D-A0CE-6500FD9F1B95")
)

// Attributes of a variable.
const (
	NonVolatile       = 1
	BootserviceAccess = 2
	RuntimeAccess     = 4
)

const (
	fvHeaderLen    = 0x48
	storeHeaderLen = 0x1c
	varHeaderLen   = 60
	varStartID     = 0x55aa
	varAdded       = 0x3f
	varDeleted     = 0xfd // ANDed into the state: deleted
)

// Variable is one live variable of a store.
type Variable struct {
	Name       string
	GUID       GUID
	Attributes uint32
	Data       []byte
}

// Store is a variable store being edited in place in its flash image.
type Store struct {
	b     []byte
	start int // first variable
	limit int // end of the store
}

// Open reads the variable store at the start of the flash image b (edited
// in place).
func Open(b []byte) (*Store, error) {
	if len(b) < fvHeaderLen+storeHeaderLen || string(b[0x28:0x2c]) != "_FVH" {
		return nil, errors.New("efivars: no firmware volume header (a blank store: Format it first)")
	}
	hl := int(binary.LittleEndian.Uint16(b[0x30:]))
	if hl < fvHeaderLen || hl+storeHeaderLen > len(b) {
		return nil, fmt.Errorf("efivars: bad volume header length %d", hl)
	}
	if GUID(b[hl:hl+16]) != authenticatedVar {
		return nil, errors.New("efivars: not an authenticated variable store")
	}
	size := int(binary.LittleEndian.Uint32(b[hl+16:]))
	if size < storeHeaderLen || hl+size > len(b) {
		return nil, fmt.Errorf("efivars: bad store size %#x", size)
	}
	return &Store{b: b, start: align4(hl + storeHeaderLen), limit: hl + size}, nil
}

// ArmVirtQemu's flash layout (ArmVirtQemu.fdf): the variable store, the
// fault-tolerant write working block and its spare, 256 KiB each, in a
// volume of 256 KiB blocks.
const armVirtBlock = 0x40000

// ArmVirtVolume is the head of an AAVMF variables flash that holds the
// store and the fault-tolerant write blocks: all that Format writes and Open
// reads; the rest of the 64 MiB bank stays as it was.
const ArmVirtVolume = 3 * armVirtBlock

// Format writes an empty variable store into a blank (all-zero) AAVMF
// variables image, as ArmVirtQemu's firmware does on its first boot: the
// volume header, the store header, and the fault-tolerant write working
// block's header; the rest erased (0xff).
func Format(b []byte) error {
	if len(b) < ArmVirtVolume {
		return fmt.Errorf("efivars: %d bytes is too small for ArmVirtQemu's variable store", len(b))
	}
	for _, c := range b[:ArmVirtVolume] {
		if c != 0 {
			return errors.New("efivars: the image is not blank")
		}
	}
	for i := range b[:ArmVirtVolume] {
		b[i] = 0xff
	}
	le := binary.LittleEndian
	h := b[:fvHeaderLen]
	clear(h[:16]) // zero vector
	copy(h[16:], systemNvDataFv[:])
	le.PutUint64(h[0x20:], ArmVirtVolume)
	copy(h[0x28:], "_FVH")
	le.PutUint32(h[0x2c:], 0xe36) // read/write enabled and status, erase polarity 1, aligned
	le.PutUint16(h[0x30:], fvHeaderLen)
	le.PutUint16(h[0x32:], 0)       // checksum, below
	le.PutUint16(h[0x34:], 0)       // no extended header
	h[0x36], h[0x37] = 0, 2         // reserved, revision
	le.PutUint32(h[0x38:], 0x100)   // block map: 256 blocks ...
	le.PutUint32(h[0x3c:], 0x40000) // ... of 256 KiB (the whole flash bank)
	clear(h[0x40:0x48])             // end of the block map
	var sum uint16
	for i := 0; i < fvHeaderLen; i += 2 {
		sum += le.Uint16(h[i:])
	}
	le.PutUint16(h[0x32:], -sum)
	s := b[fvHeaderLen : fvHeaderLen+storeHeaderLen]
	copy(s, authenticatedVar[:])
	le.PutUint32(s[16:], armVirtBlock-fvHeaderLen)
	s[20], s[21] = 0x5a, 0xfe // formatted, healthy
	clear(s[22:])
	// The working block header: its CRC is over the header with the CRC
	// and state bytes erased, then the state says "valid".
	w := b[armVirtBlock : armVirtBlock+32]
	copy(w, ftwWorkingBlock[:])
	le.PutUint64(w[24:], armVirtBlock-32) // write queue size
	le.PutUint32(w[16:], crc32.ChecksumIEEE(w))
	w[20] = 0xfe
	return nil
}

// Vars lists the live variables.
func (s *Store) Vars() ([]Variable, error) {
	var out []Variable
	_, err := s.walk(func(off int, v Variable, live bool) {
		if live {
			out = append(out, v)
		}
	})
	return out, err
}

// Get returns the data of the live variable name, or false.
func (s *Store) Get(name string, guid GUID) ([]byte, bool) {
	vars, err := s.Vars()
	if err != nil {
		return nil, false
	}
	for _, v := range vars {
		if v.Name == name && v.GUID == guid {
			return v.Data, true
		}
	}
	return nil, false
}

// Set writes the variable, marking a live one of the same name deleted.
// A replaced variable keeps its authentication fields (monotonic count,
// time stamp, key index): what a signed update of it is checked against.
func (s *Store) Set(v Variable) error {
	var auth [28]byte
	replaced := -1
	end, err := s.walk(func(off int, old Variable, live bool) {
		if live && old.Name == v.Name && old.GUID == v.GUID {
			replaced = off
			copy(auth[:], s.b[off+8:off+36])
		}
	})
	if err != nil {
		return err
	}
	name := encodeName(v.Name)
	n := varHeaderLen + len(name) + len(v.Data)
	if end+n > s.limit {
		return fmt.Errorf("efivars: no room for %s (%d bytes)", v.Name, n)
	}
	if replaced >= 0 {
		s.b[replaced+2] &= varDeleted
	}
	h := s.b[end : end+varHeaderLen]
	clear(h)
	le := binary.LittleEndian
	le.PutUint16(h[0:], varStartID)
	h[2] = varAdded
	le.PutUint32(h[4:], v.Attributes)
	// Monotonic count, time stamp and public key index: the old copy's, or
	// zero for a new variable.
	copy(h[8:36], auth[:])
	le.PutUint32(h[36:], uint32(len(name)))
	le.PutUint32(h[40:], uint32(len(v.Data)))
	copy(h[44:], v.GUID[:])
	copy(s.b[end+varHeaderLen:], name)
	copy(s.b[end+varHeaderLen+len(name):], v.Data)
	return nil
}

// walk calls fn for each variable in the store, live or not, with its
// offset, and returns where the variables end (the free space).
func (s *Store) walk(fn func(off int, v Variable, live bool)) (int, error) {
	le := binary.LittleEndian
	off := s.start
	for off+varHeaderLen <= s.limit && le.Uint16(s.b[off:]) == varStartID {
		h := s.b[off : off+varHeaderLen]
		ns, ds := int(le.Uint32(h[36:])), int(le.Uint32(h[40:]))
		if ns < 0 || ds < 0 || off+varHeaderLen+ns+ds > s.limit {
			return 0, fmt.Errorf("efivars: variable at %#x runs past the store", off)
		}
		name := decodeName(s.b[off+varHeaderLen : off+varHeaderLen+ns])
		data := s.b[off+varHeaderLen+ns : off+varHeaderLen+ns+ds]
		fn(off, Variable{Name: name, GUID: GUID(h[44:60]), Attributes: le.Uint32(h[4:]), Data: data}, h[2] == varAdded)
		off = align4(off + varHeaderLen + ns + ds)
	}
	return off, nil
}

func align4(n int) int { return (n + 3) &^ 3 }

// encodeName is name in UTF-16LE with its terminating NUL.
func encodeName(name string) []byte {
	var b []byte
	for _, r := range utf16.Encode([]rune(name)) {
		b = binary.LittleEndian.AppendUint16(b, r)
	}
	return append(b, 0, 0)
}

func decodeName(b []byte) string {
	u := make([]uint16, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		c := binary.LittleEndian.Uint16(b[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u))
}
