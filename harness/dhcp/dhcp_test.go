package dhcp

import (
	"maps"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/timeline"
)

// recorder is a PacketConn that keeps what the server sends.
type recorder struct {
	mu   sync.Mutex
	sent []*dhcpv4.DHCPv4
	to   []net.Addr
}

func (r *recorder) WriteTo(b []byte, a net.Addr) (int, error) {
	m, err := dhcpv4.FromBytes(b)
	if err != nil {
		return 0, err
	}
	r.mu.Lock()
	r.sent, r.to = append(r.sent, m), append(r.to, a)
	r.mu.Unlock()
	return len(b), nil
}
func (r *recorder) ReadFrom([]byte) (int, net.Addr, error) { select {} }
func (r *recorder) Close() error                           { return nil }
func (r *recorder) LocalAddr() net.Addr                    { return &net.UDPAddr{Port: 67} }
func (r *recorder) SetDeadline(time.Time) error            { return nil }
func (r *recorder) SetReadDeadline(time.Time) error        { return nil }
func (r *recorder) SetWriteDeadline(time.Time) error       { return nil }

// newServer is a server that knows the test's MAC (leased 10.0.2.15), as
// the lab leases its guests' addresses before they boot.
func newServer(policy Policy) (*Server, *timeline.Timeline) {
	tl := timeline.New()
	s := &Server{cfg: Config{ServerIP: netip.MustParseAddr("10.0.2.2"), Subnet: netip.MustParsePrefix("10.0.2.0/24"),
		PoolStart: netip.MustParseAddr("10.0.2.15"), LeaseTime: time.Hour, Policy: policy, Timeline: tl},
		leases: map[string]netip.Addr{}, silent: map[string]bool{}, family: map[string]string{}, next: netip.MustParseAddr("10.0.2.15")}
	s.Lease(mac)
	return s, tl
}

var mac = net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 1}

func discover(t *testing.T, mods ...dhcpv4.Modifier) *dhcpv4.DHCPv4 {
	m, err := dhcpv4.NewDiscovery(mac, mods...)
	assert.NilError(t, err)
	return m
}

func TestOfferCarriesPolicyDecision(t *testing.T) {
	var seen Client
	s, tl := newServer(func(c Client) Boot { seen = c; return Boot{File: "ipxe.efi", Why: "test"} })
	r := &recorder{}
	bcast := &net.UDPAddr{IP: net.IPv4bcast, Port: 68}
	s.handle(r, bcast, discover(t,
		dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient:Arch:00007:UNDI:003000")),
		dhcpv4.WithGeneric(dhcpv4.OptionClientSystemArchitectureType, []byte{0, 7})))
	assert.Equal(t, len(r.sent), 1)
	offer := r.sent[0]
	assert.Equal(t, offer.MessageType(), dhcpv4.MessageTypeOffer)
	assert.Equal(t, offer.YourIPAddr.String(), "10.0.2.15")
	assert.Equal(t, offer.BootFileName, "ipxe.efi")
	assert.Equal(t, offer.ServerIdentifier().String(), "10.0.2.2")
	// No "PXEClient" class in the reply: UEFI would then want PXE boot
	// server options and reject the offer.
	assert.Equal(t, offer.ClassIdentifier(), "")
	assert.Equal(t, seen.Arch, ArchEFIx64)
	assert.Equal(t, seen.IPXE, false)
	kinds := []string{}
	for _, e := range tl.Events("") {
		kinds = append(kinds, e.Kind)
	}
	assert.DeepEqual(t, kinds, []string{"discover", "offer"})
}

func TestIPXEGetsNoProxyDHCPWait(t *testing.T) {
	s, _ := newServer(func(c Client) Boot { return Boot{File: "http://10.0.2.2/boot.ipxe"} })
	r := &recorder{}
	s.handle(r, &net.UDPAddr{IP: net.IPv4bcast, Port: 68}, discover(t, dhcpv4.WithUserClass("iPXE", false)))
	assert.Equal(t, len(r.sent), 1)
	assert.DeepEqual(t, r.sent[0].Options.Get(dhcpv4.GenericOptionCode(175)), []byte{176, 1, 1})
}

func TestRequestAckNakAndSilence(t *testing.T) {
	s, tl := newServer(nil)
	s.cfg.Policy = func(Client) Boot { return Boot{} }
	r := &recorder{}
	peer := &net.UDPAddr{IP: net.IPv4bcast, Port: 68}
	req := func(ip string) *dhcpv4.DHCPv4 {
		m, err := dhcpv4.New(dhcpv4.WithHwAddr(mac), dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
			dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP(ip))))
		assert.NilError(t, err)
		return m
	}
	s.handle(r, peer, req("10.0.2.15"))
	s.handle(r, peer, req("10.0.2.99"))
	assert.Equal(t, r.sent[0].MessageType(), dhcpv4.MessageTypeAck)
	assert.Equal(t, r.sent[1].MessageType(), dhcpv4.MessageTypeNak)
	s.Ignore(mac, true)
	s.handle(r, peer, discover(t))
	assert.Equal(t, len(r.sent), 2, "an ignored client got an answer")
	evs := tl.Events("")
	assert.Equal(t, evs[len(evs)-1].Kind, "ignored")
}

func TestLeasesAreStableAndDistinct(t *testing.T) {
	s, _ := newServer(nil)
	a, _ := s.Lease(mac)
	b, _ := s.Lease(net.HardwareAddr{2, 0, 0, 0, 0, 2})
	a2, _ := s.Lease(mac)
	assert.Equal(t, a, a2)
	assert.Assert(t, a != b)
}

func TestHTTPClientGetsItsClassBack(t *testing.T) {
	s, _ := newServer(func(c Client) Boot { return Boot{File: "http://10.0.2.2/ipxe.efi"} })
	r := &recorder{}
	s.handle(r, &net.UDPAddr{IP: net.IPv4bcast, Port: 68}, discover(t,
		dhcpv4.WithOption(dhcpv4.OptClassIdentifier("HTTPClient:Arch:00016:UNDI:003001"))))
	assert.Equal(t, r.sent[0].ClassIdentifier(), "HTTPClient")
	assert.Equal(t, r.sent[0].BootFileName, "http://10.0.2.2/ipxe.efi")
}

// FuzzHandle sends the server a run of messages (length-prefixed in the
// input, parsed as DHCP: discovers, requests for any address, releases,
// declines, made-up MACs, odd options). Beyond "no panic" it holds that
// the lease table never grows (only the lab's own guest has an address,
// and it keeps the one it had), that every reply is a BOOTREPLY to a MAC
// the lab knows, with the request's transaction ID, and that an address
// offered or acked is that MAC's lease.
func FuzzHandle(f *testing.F) {
	frame := func(ms ...*dhcpv4.DHCPv4) []byte {
		var out []byte
		for _, m := range ms {
			b := m.ToBytes()
			out = append(out, byte(len(b)>>8), byte(len(b)))
			out = append(out, b...)
		}
		return out
	}
	d, _ := dhcpv4.NewDiscovery(mac, dhcpv4.WithUserClass("iPXE", false))
	req, _ := dhcpv4.NewRequestFromOffer(d, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("10.0.2.77"))))
	other, _ := dhcpv4.NewDiscovery(net.HardwareAddr{2, 0, 0, 0, 0, 7})
	f.Add(frame(d))
	f.Add(frame(d, req, other))
	rel, _ := dhcpv4.New(dhcpv4.WithHwAddr(mac), dhcpv4.WithMessageType(dhcpv4.MessageTypeRelease))
	f.Add(frame(rel, d))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, tl := newServer(func(c Client) Boot { return Boot{File: "x", RootPath: "10.0.2.2:/r"} })
		want := maps.Clone(s.leases)
		r := &recorder{}
		for len(b) >= 2 {
			n := min(int(b[0])<<8|int(b[1]), len(b)-2)
			m, err := dhcpv4.FromBytes(b[2 : 2+n])
			b = b[2+n:]
			if err != nil {
				continue
			}
			before := len(r.sent)
			s.handle(r, &net.UDPAddr{IP: net.IPv4bcast, Port: 68}, m)
			for _, reply := range r.sent[before:] {
				if reply.OpCode != dhcpv4.OpcodeBootReply || reply.TransactionID != m.TransactionID {
					t.Fatalf("a reply that is not a BOOTREPLY to the request: %s", reply.Summary())
				}
				lease, ok := want[reply.ClientHWAddr.String()]
				if !ok {
					t.Fatalf("answered a MAC the lab has no guest for: %s", reply.ClientHWAddr)
				}
				if y := reply.YourIPAddr; !y.IsUnspecified() && !y.Equal(net.IP(lease.AsSlice())) {
					t.Fatalf("gave %s to %s, whose lease is %s", y, reply.ClientHWAddr, lease)
				}
			}
		}
		if !maps.Equal(s.leases, want) {
			t.Fatalf("the lease table changed: %v, was %v", s.leases, want)
		}
		for _, e := range tl.Events("") {
			if e.Kind == "panic" {
				t.Fatalf("the server panicked (recovered): %s", e.Msg)
			}
		}
	})
}

func TestReserveGivesTheRecordedAddress(t *testing.T) {
	s, _ := newServer(nil)
	other := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 2}
	assert.NilError(t, s.Reserve(mac, netip.MustParseAddr("10.0.2.17")))
	ip, err := s.Lease(mac)
	assert.NilError(t, err)
	assert.Equal(t, ip.String(), "10.0.2.17")
	assert.NilError(t, s.Reserve(mac, netip.MustParseAddr("10.0.2.17")), "the same reservation again")
	// The pool skips a reserved address.
	s.next = netip.MustParseAddr("10.0.2.17")
	ip, err = s.Lease(other)
	assert.NilError(t, err)
	assert.Equal(t, ip.String(), "10.0.2.18")
	for _, bad := range []string{"10.0.2.18", "10.0.2.2", "10.0.2.0", "10.0.2.255", "10.0.3.5"} {
		assert.Check(t, s.Reserve(net.HardwareAddr{2, 0, 0, 0, 0, 9}, netip.MustParseAddr(bad)) != nil, "reserved %s", bad)
	}
}

// A MAC the lab leased nothing to gets no answer and no address, however
// many a guest makes up: the pool is not drained.
func TestUnknownMACsGetNothing(t *testing.T) {
	s, tl := newServer(func(Client) Boot { return Boot{} })
	r := &recorder{}
	for i := 0; i < 300; i++ {
		m, err := dhcpv4.NewDiscovery(net.HardwareAddr{2, 0, 0, 0, byte(i >> 8), byte(i)})
		assert.NilError(t, err)
		s.handle(r, &net.UDPAddr{IP: net.IPv4bcast, Port: 68}, m)
	}
	assert.Equal(t, len(r.sent), 0)
	assert.Equal(t, len(s.leases), 1, "only the lab's own guest has a lease")
	evs := tl.Events("")
	assert.Equal(t, evs[len(evs)-1].Kind, "refused")
}

// TestReleasedAddressesComeBack: a long-lived lab's pool never runs dry
// while guests come and go: an address given back is leased again once the
// pool's end is reached, and the broadcast address is never a lease.
func TestReleasedAddressesComeBack(t *testing.T) {
	s, _ := newServer(nil)
	macOf := func(i int) net.HardwareAddr { return net.HardwareAddr{2, 0, 0, 0, byte(i >> 8), byte(i)} }
	var leased []netip.Addr
	for i := 0; ; i++ {
		ip, err := s.Lease(macOf(i))
		if err != nil {
			break
		}
		assert.Assert(t, ip != netip.MustParseAddr("10.0.2.255"), "the broadcast address leased")
		leased = append(leased, ip)
	}
	assert.Equal(t, len(leased), 254-15) // .15 to .254, less the test MAC's .15
	_, err := s.Lease(net.HardwareAddr{2, 9, 9, 9, 9, 9})
	assert.ErrorContains(t, err, "exhausted")
	s.Release(macOf(7))
	ip, err := s.Lease(net.HardwareAddr{2, 9, 9, 9, 9, 9})
	assert.NilError(t, err)
	assert.Equal(t, ip, leased[7])
}
