package dhcp

import (
	"net"
	"net/netip"
	"sync"
	"testing"

	"github.com/insomniacslk/dhcp/dhcpv6"
	"github.com/insomniacslk/dhcp/iana"
	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"
)

// recorder6 is a PacketConn that keeps the DHCPv6 messages the server sends.
type recorder6 struct {
	recorder
	mu6  sync.Mutex
	sent []*dhcpv6.Message
}

func (r *recorder6) WriteTo(b []byte, a net.Addr) (int, error) {
	d, err := dhcpv6.FromBytes(b)
	if err != nil {
		return 0, err
	}
	r.mu6.Lock()
	r.sent = append(r.sent, d.(*dhcpv6.Message))
	r.mu6.Unlock()
	return len(b), nil
}

// newServer6 is newServer answering DHCPv6 for the test's MAC.
func newServer6(policy Policy, family string) *Server {
	s, _ := newServer(policy)
	s.cfg.ServerIP6 = netip.MustParseAddr("fd4e:4248::2")
	s.cfg.Prefix6 = netip.MustParsePrefix("fd4e:4248::/64")
	s.duid = &dhcpv6.DUIDLL{HWType: iana.HWTypeEthernet, LinkLayerAddr: net.HardwareAddr{2, 0x4e, 0x42, 0x48, 0, 2}}
	s.Family(mac, family)
	return s
}

// peer6 is the test MAC's EUI-64 link-local address, which clients speak from.
var peer6 = &net.UDPAddr{IP: net.ParseIP("fe80::5054:ff:fe4e:4201"), Port: 546, Zone: "1"}

func solicit(t *testing.T, mods ...dhcpv6.Modifier) *dhcpv6.Message {
	// A DUID the server cannot read a MAC from: the address must do.
	mods = append(mods, dhcpv6.WithClientID(&dhcpv6.DUIDUUID{UUID: [16]byte{1, 2, 3}}), dhcpv6.WithIAID([4]byte{0xde, 0xad, 0xbe, 0xef}))
	m, err := dhcpv6.NewMessage(mods...)
	assert.NilError(t, err)
	m.MessageType = dhcpv6.MessageTypeSolicit
	return m
}

// TestAdvertiseForUEFIHTTPBoot: what EDK2's HTTP boot over IPv6 needs to
// take an advertisement: its own IAID back with an address, the server's
// DUID, the boot file URL (option 59), vendor class 343 "HTTPClient", and
// preference 255 so it does not wait for others.
func TestAdvertiseForUEFIHTTPBoot(t *testing.T) {
	var clients []Client
	s := newServer6(func(c Client) Boot {
		clients = append(clients, c)
		return Boot{File: "http://[fd4e:4248::2]/g1/boot.efi"}
	}, V6)
	r := &recorder6{}
	sol := solicit(t, dhcpv6.WithArchType(iana.Arch(16)),
		dhcpv6.WithOption(&dhcpv6.OptVendorClass{EnterpriseNumber: 343, Data: [][]byte{[]byte("HTTPClient:Arch:00016:UNDI:003001")}}))
	s.handle6(r, peer6, sol)
	assert.Assert(t, is.Len(r.sent, 1))
	c := clients[0]
	assert.Check(t, c.V6 && c.Arch == 16 && c.MAC.String() == mac.String() && c.VendorClass == "HTTPClient:Arch:00016:UNDI:003001", "client %s", c)
	adv := r.sent[0]
	assert.Equal(t, adv.MessageType, dhcpv6.MessageTypeAdvertise)
	assert.Equal(t, adv.TransactionID, sol.TransactionID)
	ia := adv.Options.OneIANA()
	assert.Assert(t, ia != nil)
	assert.Equal(t, ia.IaId, [4]byte{0xde, 0xad, 0xbe, 0xef})
	assert.Equal(t, ia.Options.OneAddress().IPv6Addr.String(), "fd4e:4248::15")
	assert.Check(t, adv.Options.ServerID().Equal(s.duid))
	assert.Check(t, is.Equal(adv.Options.Preference(), uint8(255)))
	assert.Check(t, is.Equal(adv.Options.BootFileURL(), "http://[fd4e:4248::2]/g1/boot.efi"))
	assert.Check(t, is.DeepEqual(adv.Options.VendorClass(343), [][]byte{[]byte("HTTPClient")}))

	// The request that follows gets the same address in a reply.
	req, err := dhcpv6.NewRequestFromAdvertise(adv)
	assert.NilError(t, err)
	s.handle6(r, peer6, req)
	assert.Assert(t, is.Len(r.sent, 2))
	assert.Equal(t, r.sent[1].MessageType, dhcpv6.MessageTypeReply)
	assert.Equal(t, r.sent[1].Options.OneIANA().Options.OneAddress().IPv6Addr.String(), "fd4e:4248::15")
}

// TestDHCPv6TFTPFileBecomesURL: a PXE boot file (a TFTP path in DHCPv4) is
// a tftp:// URL on the server's IPv6 address, as option 59 must be.
func TestDHCPv6TFTPFileBecomesURL(t *testing.T) {
	s := newServer6(func(Client) Boot { return Boot{File: "ipxe.efi"} }, V6)
	r := &recorder6{}
	s.handle6(r, peer6, solicit(t, dhcpv6.WithRapidCommit))
	assert.Assert(t, is.Len(r.sent, 1))
	assert.Equal(t, r.sent[0].MessageType, dhcpv6.MessageTypeReply, "rapid commit: a reply at once")
	assert.Equal(t, r.sent[0].Options.BootFileURL(), "tftp://[fd4e:4248::2]/ipxe.efi")
}

// TestDHCPv6AnswersByFamily: an IPv4 guest and an ignored (no-dhcp) one get
// no DHCPv6 answer; an IPv6-only guest gets no DHCPv4 answer.
func TestDHCPv6AnswersByFamily(t *testing.T) {
	for _, fam := range []string{V4, V6, Dual} {
		s := newServer6(func(Client) Boot { return Boot{} }, fam)
		r := &recorder6{}
		s.handle6(r, peer6, solicit(t))
		assert.Check(t, is.Len(r.sent, map[string]int{V4: 0, V6: 1, Dual: 1}[fam]), "family %s", fam)
		r4 := &recorder{}
		s.handle(r4, &net.UDPAddr{Port: 68}, discover(t))
		assert.Check(t, is.Len(r4.sent, map[string]int{V4: 1, V6: 0, Dual: 1}[fam]), "family %s", fam)
	}
	s := newServer6(func(Client) Boot { return Boot{} }, V6)
	s.Ignore(mac, true)
	r := &recorder6{}
	s.handle6(r, peer6, solicit(t))
	assert.Check(t, is.Len(r.sent, 0))
}

func TestLease6ReadsLikeTheIPv4Lease(t *testing.T) {
	assert.Equal(t, v6For(netip.MustParsePrefix("fd4e:4248::/64"), netip.MustParseAddr("10.0.2.15")).String(), "fd4e:4248::15")
	assert.Equal(t, v6For(netip.MustParsePrefix("fd4e:4248::/64"), netip.MustParseAddr("10.0.2.254")).String(), "fd4e:4248::254")
	assert.Equal(t, macOfLinkLocal(peer6.IP).String(), mac.String())
	assert.Check(t, macOfLinkLocal(net.ParseIP("fd4e:4248::15")) == nil)
}

// TestDHCPv6IdentityIsTheAddress: a client is known by the EUI-64
// link-local address it speaks from (the switch binds it to the port),
// never by a DUID naming a MAC: a message from another address whose DUID
// names the guest's MAC gets nothing.
func TestDHCPv6IdentityIsTheAddress(t *testing.T) {
	s := newServer6(func(Client) Boot { return Boot{File: "g1/boot.ipxe"} }, V6)
	m, err := dhcpv6.NewMessage(dhcpv6.WithClientID(&dhcpv6.DUIDLL{HWType: iana.HWTypeEthernet, LinkLayerAddr: mac}), dhcpv6.WithIAID([4]byte{1, 2, 3, 4}))
	assert.NilError(t, err)
	m.MessageType = dhcpv6.MessageTypeSolicit
	for _, from := range []string{"fe80::1", "fe80::5054:ff:fe4e:4299"} { // not EUI-64; another MAC's
		r := &recorder6{}
		s.handle6(r, &net.UDPAddr{IP: net.ParseIP(from), Port: 546, Zone: "1"}, m)
		assert.Check(t, is.Len(r.sent, 0), "answered %s for the DUID's MAC", from)
	}
	r := &recorder6{}
	s.handle6(r, peer6, m)
	assert.Check(t, is.Len(r.sent, 1))
}
