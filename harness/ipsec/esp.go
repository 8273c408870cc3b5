// Package ipsec is ESP (RFC 4303) in transport mode for the lab's host
// stack: AES-GCM as RFC 4106 uses it (128- or 256-bit key with a 4-byte
// salt, an 8-byte explicit IV, a 16-byte ICV), one security association per
// direction with its SPI, sequence numbers and anti-replay window, and a
// security policy table that says, per protocol and port, whether traffic is
// protected, passes in clear, or is dropped. Every SA and policy counts what
// it did, so a failed boot can show its evidence.
package ipsec

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
)

// Sizes of the ESP fields with AES-GCM (RFC 4106).
const (
	headerLen = 8  // SPI, sequence number
	ivLen     = 8  // explicit IV
	icvLen    = 16 // integrity check value
	saltLen   = 4
	// Overhead is what ESP adds to a payload at most: header, IV, ICV,
	// up to 3 bytes of padding, pad length and next header.
	Overhead = headerLen + ivLen + icvLen + 3 + 2
)

// ProtoESP is ESP's IP protocol number.
const ProtoESP = 50

// Errors Open returns, for errors.Is.
var (
	ErrShort   = errors.New("esp: packet too short")
	ErrSPI     = errors.New("esp: unknown SPI")
	ErrAuth    = errors.New("esp: authentication failed (ICV mismatch)")
	ErrReplay  = errors.New("esp: replayed or too old sequence number")
	ErrPadding = errors.New("esp: bad padding")
)

// Counters are what an SA has done.
type Counters struct {
	Packets, Bytes uint64 // sealed (outbound) or opened (inbound) successfully
	AuthFailures   uint64
	Replays        uint64
	Malformed      uint64
}

// SA is one direction's security association.
type SA struct {
	SPI  uint32
	aead cipher.AEAD
	salt [saltLen]byte

	mu       sync.Mutex
	seq      uint32 // outbound: the last sequence number sent
	top      uint32 // inbound: the highest sequence number accepted
	window   uint64 // inbound: bit i set = top-i seen
	counters Counters
}

// ReplayWindow is how many sequence numbers behind the highest an inbound
// SA still accepts (once each).
const ReplayWindow = 64

// NewSA makes an SA from RFC 4106 keying material: the AES key (16 or 32
// bytes) followed by the 4-byte salt.
func NewSA(spi uint32, keymat []byte) (*SA, error) {
	if len(keymat) != 16+saltLen && len(keymat) != 32+saltLen {
		return nil, fmt.Errorf("esp: keying material is %d bytes; want 20 (AES-128) or 36 (AES-256) with the salt", len(keymat))
	}
	klen := len(keymat) - saltLen
	block, err := aes.NewCipher(keymat[:klen])
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	sa := &SA{SPI: spi, aead: aead}
	copy(sa.salt[:], keymat[klen:])
	return sa, nil
}

// Counters returns a snapshot of the SA's counters.
func (sa *SA) Counters() Counters {
	sa.mu.Lock()
	defer sa.mu.Unlock()
	return sa.counters
}

// Seal appends to dst the ESP packet carrying payload (the transport
// header and data) with nextHeader (the payload's protocol number). The IV
// is the sequence number, which never repeats under one key.
func (sa *SA) Seal(dst []byte, nextHeader byte, payload []byte) ([]byte, error) {
	sa.mu.Lock()
	if sa.seq == ^uint32(0) {
		sa.mu.Unlock()
		return nil, errors.New("esp: sequence numbers exhausted; the SA must be replaced")
	}
	sa.seq++
	seq := sa.seq
	sa.mu.Unlock()
	var iv [ivLen]byte
	binary.BigEndian.PutUint64(iv[:], uint64(seq))
	return sa.sealWith(dst, seq, iv, nextHeader, payload), nil
}

func (sa *SA) sealWith(dst []byte, seq uint32, iv [ivLen]byte, nextHeader byte, payload []byte) []byte {
	// Pad so payload, pad length and next header end on 4 bytes; the pad
	// bytes are 1, 2, 3 ... (RFC 4303 2.4).
	pad := (4 - (len(payload)+2)%4) % 4
	start := len(dst)
	dst = binary.BigEndian.AppendUint32(dst, sa.SPI)
	dst = binary.BigEndian.AppendUint32(dst, seq)
	dst = append(dst, iv[:]...)
	plain := make([]byte, 0, len(payload)+pad+2)
	plain = append(plain, payload...)
	for i := 1; i <= pad; i++ {
		plain = append(plain, byte(i))
	}
	plain = append(plain, byte(pad), nextHeader)
	nonce := sa.nonce(iv)
	aad := dst[start : start+headerLen]
	dst = sa.aead.Seal(dst, nonce[:], plain, aad)
	sa.mu.Lock()
	sa.counters.Packets++
	sa.counters.Bytes += uint64(len(payload))
	sa.mu.Unlock()
	return dst
}

func (sa *SA) nonce(iv [ivLen]byte) [saltLen + ivLen]byte {
	var n [saltLen + ivLen]byte
	copy(n[:], sa.salt[:])
	copy(n[saltLen:], iv[:])
	return n
}

// RestartReplay starts the inbound replay window again: the peer rebooted
// and sends from sequence number 1 with the same keys (a lab's guest has
// them in its archive; no IKE makes new ones). Outbound numbers go on.
func (sa *SA) RestartReplay() {
	sa.mu.Lock()
	sa.top, sa.window = 0, 0
	sa.mu.Unlock()
}

// SPIOf reads the SPI of an ESP packet.
func SPIOf(esp []byte) (uint32, error) {
	if len(esp) < headerLen {
		return 0, ErrShort
	}
	return binary.BigEndian.Uint32(esp), nil
}

// Open authenticates and decrypts an ESP packet for this SA and returns its
// next header and payload. A packet whose sequence number was seen, or is
// too far behind, is refused before decryption and counted as a replay; the
// window moves only for packets that authenticate.
func (sa *SA) Open(esp []byte) (nextHeader byte, payload []byte, err error) {
	if len(esp) < headerLen+ivLen+icvLen+2 {
		sa.count(func(c *Counters) { c.Malformed++ })
		return 0, nil, ErrShort
	}
	if spi := binary.BigEndian.Uint32(esp); spi != sa.SPI {
		sa.count(func(c *Counters) { c.Malformed++ })
		return 0, nil, fmt.Errorf("%w %#x (this SA is %#x)", ErrSPI, spi, sa.SPI)
	}
	seq := binary.BigEndian.Uint32(esp[4:])
	if !sa.fresh(seq) {
		sa.count(func(c *Counters) { c.Replays++ })
		return 0, nil, fmt.Errorf("%w: %d", ErrReplay, seq)
	}
	var iv [ivLen]byte
	copy(iv[:], esp[headerLen:])
	nonce := sa.nonce(iv)
	plain, err := sa.aead.Open(nil, nonce[:], esp[headerLen+ivLen:], esp[:headerLen])
	if err != nil {
		sa.count(func(c *Counters) { c.AuthFailures++ })
		return 0, nil, ErrAuth
	}
	// Authentic: the sequence number is now used, even if the contents
	// turn out malformed.
	sa.mu.Lock()
	if !sa.acceptLocked(seq) {
		sa.counters.Replays++
		sa.mu.Unlock()
		return 0, nil, fmt.Errorf("%w: %d", ErrReplay, seq)
	}
	sa.mu.Unlock()
	padLen := int(plain[len(plain)-2])
	nextHeader = plain[len(plain)-1]
	if padLen > len(plain)-2 {
		sa.count(func(c *Counters) { c.Malformed++ })
		return 0, nil, ErrPadding
	}
	body := plain[:len(plain)-2-padLen]
	for i, b := range plain[len(body) : len(plain)-2] {
		if b != byte(i+1) {
			sa.count(func(c *Counters) { c.Malformed++ })
			return 0, nil, ErrPadding
		}
	}
	sa.count(func(c *Counters) { c.Packets++; c.Bytes += uint64(len(body)) })
	return nextHeader, body, nil
}

func (sa *SA) count(f func(*Counters)) {
	sa.mu.Lock()
	f(&sa.counters)
	sa.mu.Unlock()
}

// fresh reports whether seq may be new: not seen, not behind the window.
func (sa *SA) fresh(seq uint32) bool {
	sa.mu.Lock()
	defer sa.mu.Unlock()
	return sa.checkLocked(seq)
}

func (sa *SA) checkLocked(seq uint32) bool {
	if seq == 0 {
		return false // sequence numbers start at 1
	}
	if seq > sa.top {
		return true
	}
	diff := sa.top - seq
	if diff >= ReplayWindow {
		return false
	}
	return sa.window&(1<<diff) == 0
}

// acceptLocked records seq as seen, sliding the window; false if it was
// seen meanwhile.
func (sa *SA) acceptLocked(seq uint32) bool {
	if !sa.checkLocked(seq) {
		return false
	}
	if seq > sa.top {
		shift := seq - sa.top
		if shift >= ReplayWindow {
			sa.window = 0
		} else {
			sa.window <<= shift
		}
		sa.window |= 1
		sa.top = seq
		return true
	}
	sa.window |= 1 << (sa.top - seq)
	return true
}
