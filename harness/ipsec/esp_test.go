package ipsec

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"testing"
)

// vector is an ESP AES-GCM test case of RFC 4106's test vectors
// (draft-mcgrew-gcm-test-01): key, salt+IV, SPI+sequence number (the AAD),
// the ESP plaintext (payload, padding, pad length, next header), and the
// ciphertext with its ICV.
type vector struct {
	name, key, nonce, aad, plain, cipher, icv string
}

// The cases with 32-bit sequence numbers (this ESP has no ESN), AES-128
// and AES-256.
var vectors = []vector{
	{"AES-128 SPI a5f8 seq 10", "feffe9928665731c6d6a8f9467308308", "cafebabefacedbaddecaf888", "0000a5f80000000a",
		"4500003e698f000080114dccc0a80102c0a801010a980035002a2343b2d001000001000000000000037369700963796265726369747902646b00000100010001",
		"deb22cd9b07c72c16e3a65beeb8df304a5a5897d33ae530f1ba76d5d114d2a5c3de81827c10e9a4f51330d0eec416642cfbb85a5b47e48a4ec3b9ba95d918bd1",
		"83b70d3aa8bc6ee4c309e9d85a41ad4a"},
	{"AES-256 SPI 4a2cbfe3 seq 2", "abbccddef00112233445566778899aababbccddef00112233445566778899aab", "112233440102030405060708", "4a2cbfe300000002",
		"4500003069a6400080062690c0a801029389155e0a9e008b2dc57ee0000000007002400020bf0000020405b40101040201020201",
		"ff425c9b724599df7a3bcd510194e00d6a78107f1b0b1cbf06efae9d65a5d763748a637985771d347f0545659f14e99def842d8e",
		"b335f4eecfdbf831824b4c4915956c96"},
	{"AES-128 zero key seq 1", "00000000000000000000000000000000", "000000000000000000000000", "0000000000000001",
		"4500003c99c500008001cb7a40679318010101010800075c020044006162636465666768696a6b6c6d6e6f707172737475767761626364656667686901020201",
		"4688daf2f973a392732909c331d56d60f694abaa414b5e7ff5fdcdfff5e9a284456476492719ffb64de7d9dca1e1d894bc3bd57873ed4d181d19d4d5c8c18af3",
		"f821d496eeb096e98ad2b69e4799c71d"},
	{"AES-128 dummy packet seq ffffffff", "7d773d00c144c525ac619d18c84a3f47", "d966426743457e9182443bc6", "335467aeffffffff",
		"01020201", "437f866b", "cb3f699fe9b0822bac961c4504bef270"},
}

func unhex(t testing.TB, s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestVectors: Seal builds the vectors' ESP packets byte for byte, and
// Open takes them apart again.
func TestVectors(t *testing.T) {
	for _, v := range vectors {
		t.Run(v.name, func(t *testing.T) {
			nonce, aad, plain := unhex(t, v.nonce), unhex(t, v.aad), unhex(t, v.plain)
			spi, seq := binary.BigEndian.Uint32(aad), binary.BigEndian.Uint32(aad[4:])
			keymat := append(unhex(t, v.key), nonce[:4]...)
			want := append(append(append(append([]byte(nil), aad...), nonce[4:]...), unhex(t, v.cipher)...), unhex(t, v.icv)...)

			padLen := int(plain[len(plain)-2])
			nh := plain[len(plain)-1]
			body := plain[:len(plain)-2-padLen]

			out, err := NewSA(spi, keymat)
			if err != nil {
				t.Fatal(err)
			}
			var iv [ivLen]byte
			copy(iv[:], nonce[4:])
			if got := out.sealWith(nil, seq, iv, nh, body); !bytes.Equal(got, want) {
				t.Fatalf("seal:\n got %x\nwant %x", got, want)
			}
			in, _ := NewSA(spi, keymat)
			gotNH, gotBody, err := in.Open(want)
			if err != nil {
				t.Fatal(err)
			}
			if gotNH != nh || !bytes.Equal(gotBody, body) {
				t.Fatalf("open: next header %d body %x", gotNH, gotBody)
			}
			if c := in.Counters(); c.Packets != 1 || c.Bytes != uint64(len(body)) {
				t.Fatalf("counters %+v", c)
			}
		})
	}
}

func pair(t testing.TB, keyLen int) (*SA, *SA) {
	keymat := bytes.Repeat([]byte{7}, keyLen+saltLen)
	a, err := NewSA(0x1001, keymat)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := NewSA(0x1001, keymat)
	return a, b
}

// TestRoundTripAndTamper: every payload length round-trips; one flipped bit
// anywhere fails authentication and is counted; a wrong SPI is refused.
func TestRoundTripAndTamper(t *testing.T) {
	for _, kl := range []int{16, 32} {
		out, in := pair(t, kl)
		for n := 0; n < 70; n++ {
			payload := bytes.Repeat([]byte{byte(n)}, n)
			esp, err := out.Seal(nil, 6, payload)
			if err != nil {
				t.Fatal(err)
			}
			if (len(esp)-headerLen-ivLen-icvLen)%4 != 0 {
				t.Fatalf("payload %d: ciphertext not 4-byte aligned", n)
			}
			bad := append([]byte(nil), esp...)
			bad[len(bad)/2+4] ^= 1
			if _, _, err := in.Open(bad); !errors.Is(err, ErrAuth) && !errors.Is(err, ErrSPI) && !errors.Is(err, ErrReplay) {
				t.Fatalf("payload %d: tampered packet: %v", n, err)
			}
			nh, body, err := in.Open(esp)
			if err != nil || nh != 6 || !bytes.Equal(body, payload) {
				t.Fatalf("payload %d: %v %d %x", n, err, nh, body)
			}
		}
		if c := in.Counters(); c.AuthFailures == 0 || c.Packets != 70 {
			t.Fatalf("counters %+v", c)
		}
		other, _ := NewSA(0x2002, bytes.Repeat([]byte{7}, kl+saltLen))
		esp, _ := out.Seal(nil, 6, []byte("x"))
		if _, _, err := other.Open(esp); !errors.Is(err, ErrSPI) {
			t.Fatalf("wrong SPI: %v", err)
		}
	}
	if _, err := NewSA(1, make([]byte, 24)); err == nil {
		t.Fatal("a 20-byte AES key was accepted")
	}
}

// TestReplayWindow: a packet is accepted once; late packets inside the
// window are accepted once; packets behind the window are refused.
func TestReplayWindow(t *testing.T) {
	out, in := pair(t, 16)
	var pkts [][]byte
	for i := 0; i < 200; i++ {
		p, _ := out.Seal(nil, 17, []byte{byte(i)})
		pkts = append(pkts, p) // pkts[i] has sequence number i+1
	}
	open := func(i int) error { _, _, err := in.Open(pkts[i]); return err }
	if err := open(99); err != nil { // seq 100
		t.Fatal(err)
	}
	if err := open(99); !errors.Is(err, ErrReplay) {
		t.Fatalf("replay accepted: %v", err)
	}
	if err := open(40); err != nil { // seq 41: 59 behind, inside the window
		t.Fatalf("late packet inside the window: %v", err)
	}
	if err := open(40); !errors.Is(err, ErrReplay) {
		t.Fatalf("late replay accepted: %v", err)
	}
	if err := open(30); !errors.Is(err, ErrReplay) { // seq 31: 69 behind
		t.Fatalf("packet behind the window accepted: %v", err)
	}
	if err := open(199); err != nil { // seq 200: the window jumps
		t.Fatal(err)
	}
	if err := open(99); !errors.Is(err, ErrReplay) {
		t.Fatalf("old packet accepted after the jump: %v", err)
	}
	if c := in.Counters(); c.Replays != 4 || c.Packets != 3 {
		t.Fatalf("counters %+v", c)
	}
	// A forged packet with a fresh sequence number does not move the
	// window: it fails authentication first.
	forged := append([]byte(nil), pkts[150]...)
	forged[len(forged)-1] ^= 0xff
	if _, _, err := in.Open(forged); !errors.Is(err, ErrAuth) {
		t.Fatal(err)
	}
	if err := open(150); err != nil { // seq 151, 49 behind 200: the forgery did not use it up
		t.Fatalf("the real packet after a forgery with its sequence number: %v", err)
	}
}

// FuzzOpen: arbitrary bytes never panic Open and never authenticate.
func FuzzOpen(f *testing.F) {
	out, _ := pair(f, 16)
	p, _ := out.Seal(nil, 6, []byte("hello"))
	f.Add(p)
	f.Add([]byte{0, 0, 0x10, 1, 0, 0, 0, 1})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		_, in := pair(t, 16)
		if _, _, err := in.Open(b); err == nil && !bytes.Equal(b, p) {
			t.Fatalf("forged packet opened: %x", b)
		}
	})
}

// BenchmarkSeal and BenchmarkOpen measure the ESP's own throughput on one
// core (MB/s is the payload rate) for full-size NFS read segments.
func BenchmarkSeal(b *testing.B) {
	for _, kl := range []int{16, 32} {
		b.Run(map[int]string{16: "AES-128", 32: "AES-256"}[kl], func(b *testing.B) {
			out, _ := pair(b, kl)
			payload := make([]byte, 1400)
			buf := make([]byte, 0, 1500)
			b.SetBytes(int64(len(payload)))
			for b.Loop() {
				out.Seal(buf[:0], 6, payload)
			}
		})
	}
}

func BenchmarkOpen(b *testing.B) {
	for _, kl := range []int{16, 32} {
		b.Run(map[int]string{16: "AES-128", 32: "AES-256"}[kl], func(b *testing.B) {
			out, in := pair(b, kl)
			payload := make([]byte, 1400)
			var pkts [][]byte
			for range 4096 {
				p, _ := out.Seal(nil, 6, payload)
				pkts = append(pkts, p)
			}
			b.SetBytes(int64(len(payload)))
			i := 0
			for b.Loop() {
				if i == len(pkts) {
					// Fresh SAs: sequence numbers must not replay.
					b.StopTimer()
					out, in = pair(b, kl)
					for j := range pkts {
						pkts[j], _ = out.Seal(pkts[j][:0], 6, payload)
					}
					i = 0
					b.StartTimer()
				}
				if _, _, err := in.Open(pkts[i]); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}

// TestRestartReplay: after its peer rebooted, an SA takes sequence numbers
// from 1 again, once each.
func TestRestartReplay(t *testing.T) {
	key := make([]byte, 20)
	in, err := NewSA(0x1000, key)
	if err != nil {
		t.Fatal(err)
	}
	out, _ := NewSA(0x1000, key)
	payload := []byte("hello")
	var first []byte
	for i := 0; i < 3; i++ {
		p, err := out.Seal(nil, ProtoUDP, payload)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = p
		}
		if _, _, err := in.Open(p); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := in.Open(first); err == nil {
		t.Fatal("a replayed packet was taken")
	}
	in.RestartReplay()
	if _, _, err := in.Open(first); err != nil {
		t.Fatalf("sequence number 1 after a restart: %v", err)
	}
	if _, _, err := in.Open(first); err == nil {
		t.Fatal("taken twice after the restart")
	}
}
