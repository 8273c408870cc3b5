package tftp

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	"gotest.tools/v3/poll"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"nbh.dev/nbh/harness/bootfile"
	"nbh.dev/nbh/harness/netfab"
	"nbh.dev/nbh/harness/netfab/netfabtest"
	"nbh.dev/nbh/harness/timeline"
)

func TestParseRequest(t *testing.T) {
	r, err := ParseRequest([]byte("\x00\x01boot/x.efi\x00octet\x00blksize\x001468\x00WindowSize\x008\x00"))
	assert.NilError(t, err)
	assert.Equal(t, r.Filename, "boot/x.efi")
	assert.Equal(t, r.Mode, "octet")
	assert.DeepEqual(t, r.Options, map[string]string{"blksize": "1468", "windowsize": "8"})

	for name, pkt := range map[string]string{
		"short":         "\x00\x01",
		"data opcode":   "\x00\x03abc\x00octet\x00",
		"no terminator": "\x00\x01file\x00octet",
		"empty name":    "\x00\x01\x00octet\x00",
		"odd options":   "\x00\x01f\x00octet\x00blksize\x00",
	} {
		_, err := ParseRequest([]byte(pkt))
		assert.Assert(t, err != nil, "%s: accepted", name)
	}
}

func FuzzParseRequest(f *testing.F) {
	f.Add([]byte("\x00\x01boot.scr.uimg\x00octet\x00blksize\x001468\x00tsize\x000\x00"))
	f.Add([]byte("\x00\x02x\x00netascii\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRequest(b)
		if err == nil && (r.Filename == "" || (r.Op != opRRQ && r.Op != opWRQ)) {
			t.Fatalf("accepted a bad request: %+v", r)
		}
	})
}

// client is a minimal TFTP reader speaking to the server over the fabric.
type client struct {
	t    testing.TB
	conn *gonet.UDPConn
	srv  netip.Addr
	peer *netfabtest.Peer
	tl   *timeline.Timeline
}

func newClient(t testing.TB) (*client, *Server, string) {
	tl := timeline.New()
	fab, err := netfab.New(tl, netfab.Config{})
	assert.NilError(t, err)
	t.Cleanup(func() { fab.Close() })
	root := filepath.Join(t.TempDir(), "root")
	assert.NilError(t, os.Mkdir(root, 0o755))
	r, err := os.OpenRoot(root)
	assert.NilError(t, err)
	t.Cleanup(func() { r.Close() })
	srv, err := Start(fab, fab.HostIP, bootfile.Root(r), tl)
	assert.NilError(t, err)
	t.Cleanup(func() { srv.Close() })
	port, err := fab.AddPort("peer", net.HardwareAddr{2, 0, 0, 0, 0, 9}, "")
	assert.NilError(t, err)
	peerIP := netip.MustParseAddr("10.0.2.50")
	peer, err := netfabtest.NewPeer(port, peerIP)
	assert.NilError(t, err)
	t.Cleanup(peer.Close)
	conn, err := gonet.DialUDP(peer.Stack, netfabtest.UDPAddr(peerIP, 0), nil, ipv4.ProtocolNumber)
	assert.NilError(t, err)
	t.Cleanup(func() { conn.Close() })
	return &client{t: t, conn: conn, srv: fab.HostIP, peer: peer, tl: tl}, srv, root
}

// get reads name with the given options; it returns the data or the
// server's error message.
func (c *client) get(name string, opts map[string]string) ([]byte, string) {
	req := append([]byte{0, opRRQ}, name...)
	req = append(append(req, 0), "octet\x00"...)
	for k, v := range opts {
		req = append(append(append(append(req, k...), 0), v...), 0)
	}
	srv := &net.UDPAddr{IP: net.IP(c.srv.AsSlice()), Port: 69}
	_, err := c.conn.WriteTo(req, srv)
	assert.NilError(c.t, err)
	blksize, window := 512, 1
	var out bytes.Buffer
	expect := uint16(1)
	buf := make([]byte, 70000)
	for {
		c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, from, err := c.conn.ReadFrom(buf)
		assert.NilError(c.t, err, "no answer from the server")
		p := buf[:n]
		ack := func(b uint16) {
			c.conn.WriteTo([]byte{0, opACK, byte(b >> 8), byte(b)}, from)
		}
		switch binary.BigEndian.Uint16(p) {
		case opERROR:
			return nil, string(bytes.TrimRight(p[4:], "\x00"))
		case opOACK:
			fields := bytes.Split(p[2:len(p)-1], []byte{0})
			for i := 0; i+1 < len(fields); i += 2 {
				v, _ := strconv.Atoi(string(fields[i+1]))
				switch string(fields[i]) {
				case "blksize":
					blksize = v
				case "windowsize":
					window = v
				}
			}
			ack(0)
		case opDATA:
			blk := binary.BigEndian.Uint16(p[2:])
			if blk != expect {
				continue // out of order: wait for the retransmission
			}
			out.Write(p[4:])
			last := len(p)-4 < blksize
			if last || int(blk)%window == 0 {
				ack(blk)
			}
			expect++
			if last {
				return out.Bytes(), ""
			}
		}
	}
}

func TestTransferWithOptions(t *testing.T) {
	c, _, root := newClient(t)
	data := make([]byte, 3<<20+123) // crosses many windows; not a block multiple
	rand.Read(data)
	assert.NilError(t, os.WriteFile(filepath.Join(root, "kernel"), data, 0o644))
	for _, opts := range []map[string]string{
		nil,
		{"blksize": "1468"},
		{"blksize": "1468", "windowsize": "8", "tsize": "0"},
		{"blksize": "1024", "windowsize": "64"},
	} {
		t.Run(fmt.Sprint(opts), func(t *testing.T) {
			got, errMsg := c.get("kernel", opts)
			assert.Equal(t, errMsg, "")
			assert.Assert(t, bytes.Equal(got, data), "got %d bytes, want %d", len(got), len(data))
		})
	}
	// A file whose size is an exact multiple of the block size ends with an
	// empty block.
	exact := make([]byte, 512*4)
	assert.NilError(t, os.WriteFile(filepath.Join(root, "exact"), exact, 0o644))
	got, errMsg := c.get("exact", nil)
	assert.Equal(t, errMsg, "")
	assert.Equal(t, len(got), len(exact))
}

func TestConfinedToRoot(t *testing.T) {
	c, _, root := newClient(t)
	outside := filepath.Join(filepath.Dir(root), "secret")
	assert.NilError(t, os.WriteFile(outside, []byte("secret"), 0o644))
	assert.NilError(t, os.Symlink(outside, filepath.Join(root, "link-out")))
	assert.NilError(t, os.Symlink("../secret", filepath.Join(root, "rel-out")))
	assert.NilError(t, os.WriteFile(filepath.Join(root, "ok"), []byte("fine"), 0o644))
	for _, name := range []string{"../secret", "sub/../../secret", "link-out", "rel-out", "/../secret", "..\\secret"} {
		got, errMsg := c.get(name, nil)
		assert.Assert(t, got == nil && errMsg != "", "%q escaped the root: %q", name, got)
	}
	got, errMsg := c.get("/ok", nil) // a leading slash means the root
	assert.Equal(t, errMsg, "")
	assert.Equal(t, string(got), "fine")
	_, errMsg = c.get("missing", nil)
	assert.Equal(t, errMsg, "file not found")
}

// FuzzTFTPSession sends the server a hostile client's packets over the
// fabric: the input is a list of length-prefixed packets, each to port 69
// or to the transfer port of the last reply (acks, errors, new requests
// mid-transfer). It holds that every reply is a well-formed DATA, OACK or
// ERROR, that no reply carries a byte of the file outside the root (names
// with "..", backslashes and links out are in the seeds), and that nothing
// panics, recovered or not.
func FuzzTFTPSession(f *testing.F) {
	rrq := func(name string, opts ...string) []byte {
		b := append(append([]byte{0, opRRQ}, name...), 0)
		b = append(b, "octet\x00"...)
		for _, o := range opts {
			b = append(append(b, o...), 0)
		}
		return append([]byte{byte(len(b))}, b...)
	}
	ack := func(blk byte) []byte { return []byte{0x84, 0, opACK, 0, blk} }
	f.Add(slices.Concat(rrq("ok"), ack(1)))
	f.Add(slices.Concat(rrq("../secret"), rrq("link-out"), rrq("rel-out"), rrq("..\\secret")))
	f.Add(slices.Concat(rrq("big", "blksize", "8", "windowsize", "64", "tsize", "0"), ack(0), ack(9), ack(3)))
	f.Add(slices.Concat(rrq("big", "blksize", "65464"), ack(0), []byte{0x85, 0, opERROR, 0, 0, 0}))
	f.Add([]byte{0x02, 0, opWRQ, 3, 0, opDATA, 0})

	c, _, root := newClient(f)
	secret := bytes.Repeat([]byte("SECRET!"), 200)
	os.WriteFile(filepath.Join(filepath.Dir(root), "secret"), secret, 0o644)
	os.Symlink(filepath.Join(filepath.Dir(root), "secret"), filepath.Join(root, "link-out"))
	os.Symlink("../secret", filepath.Join(root, "rel-out"))
	os.WriteFile(filepath.Join(root, "ok"), []byte("fine"), 0o644)
	os.WriteFile(filepath.Join(root, "big"), bytes.Repeat([]byte("inside "), 4000), 0o644)
	srv := &net.UDPAddr{IP: net.IP(c.srv.AsSlice()), Port: 69}

	f.Fuzz(func(t *testing.T, b []byte) {
		conn, err := gonet.DialUDP(c.peer.Stack, netfabtest.UDPAddr(netip.MustParseAddr("10.0.2.50"), 0), nil, ipv4.ProtocolNumber)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		to := net.Addr(srv)
		buf := make([]byte, 70000)
		for sent := 0; len(b) > 0 && sent < 12; sent++ {
			n := min(int(b[0]&0x7f), len(b)-1)
			pkt := b[1 : 1+n]
			dst := srv
			if b[0]&0x80 != 0 {
				dst = to.(*net.UDPAddr) // the transfer's own port
			}
			b = b[1+n:]
			conn.WriteTo(pkt, dst)
			for {
				conn.SetReadDeadline(time.Now().Add(5 * time.Millisecond))
				n, from, err := conn.ReadFrom(buf)
				if err != nil {
					break
				}
				to = from
				p := buf[:n]
				if n < 4 {
					t.Fatalf("a reply of %d bytes", n)
				}
				switch binary.BigEndian.Uint16(p) {
				case opDATA:
					if n-4 > 65464 {
						t.Fatalf("a data block of %d bytes", n-4)
					}
					if bytes.Contains(secret, p[4:]) && n > 8 {
						t.Fatalf("served bytes of the file outside the root: %q", p[4:])
					}
				case opOACK:
					if p[n-1] != 0 {
						t.Fatal("an OACK not ending in NUL")
					}
				case opERROR:
					if p[n-1] != 0 {
						t.Fatal("an ERROR not ending in NUL")
					}
				default:
					t.Fatalf("a reply with opcode %d", binary.BigEndian.Uint16(p))
				}
			}
		}
		for _, e := range c.tl.Events("") {
			if e.Kind == "panic" {
				t.Fatalf("the server panicked (recovered): %s", e.Msg)
			}
		}
	})
}

// TestClientErrorAfterOptionAck: a client that asked for the size and ends
// the transfer at the option acknowledgement probed the size; one that did
// not ask and sends an error there refused the transfer, and the timeline
// says so with its code and message.
func TestClientErrorAfterOptionAck(t *testing.T) {
	c, _, root := newClient(t)
	assert.NilError(t, os.WriteFile(filepath.Join(root, "kernel"), make([]byte, 5000), 0o644))
	abort := func(opts ...string) timeline.Event {
		t.Helper()
		req := append([]byte{0, opRRQ}, "kernel\x00octet\x00"...)
		for _, o := range opts {
			req = append(append(req, o...), 0)
		}
		srv := &net.UDPAddr{IP: net.IP(c.srv.AsSlice()), Port: 69}
		_, err := c.conn.WriteTo(req, srv)
		assert.NilError(t, err)
		buf := make([]byte, 2000)
		c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, from, err := c.conn.ReadFrom(buf)
		assert.NilError(t, err)
		assert.Equal(t, binary.BigEndian.Uint16(buf[:n]), uint16(opOACK))
		c.conn.WriteTo(append([]byte{0, opERROR, 0, 8}, "out of memory\x00"...), from)
		var last timeline.Event
		poll.WaitOn(t, func(poll.LogT) poll.Result {
			evs := c.tl.Events("")
			last = evs[len(evs)-1]
			if last.Kind == "size-query" || last.Kind == "aborted" {
				return poll.Success()
			}
			return poll.Continue("last event %s", last.Kind)
		}, poll.WithTimeout(5*time.Second))
		return last
	}
	e := abort("tsize", "0")
	assert.Equal(t, e.Kind, "size-query")
	assert.Assert(t, strings.Contains(e.Detail["error"].(string), `error 8: "out of memory"`), "%v", e.Detail)
	e = abort("blksize", "1468")
	assert.Equal(t, e.Kind, "aborted")
	assert.Assert(t, strings.Contains(e.Detail["error"].(string), `error 8: "out of memory"`), "%v", e.Detail)
}
