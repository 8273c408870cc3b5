// Package dhcp is the lab's DHCPv4 server. It hands every guest NIC a stable
// lease and decides the boot file from what the client says it is: option 93
// (client architecture), option 77 / 175 (iPXE), option 60 (PXEClient,
// HTTPClient, U-Boot). It knows nothing about QEMU: the lab gives it a Policy.
package dhcp

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/server4"
	"github.com/insomniacslk/dhcp/dhcpv6"
	"github.com/insomniacslk/dhcp/dhcpv6/server6"

	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/internal/guard"
)

// Client architecture types (RFC 4578 option 93, IANA registry).
const (
	ArchBIOS     = 0
	ArchEFIx64   = 7
	ArchEFIBC    = 9
	ArchEFIArm64 = 11
	ArchUBootA64 = 22 // arm64 U-Boot (u-boot's own choice; HTTP 0x16 is also "arm64 uefi http")
	ArchNone     = -1
)

// Client is what a DHCP request tells about the asking machine.
type Client struct {
	MAC         net.HardwareAddr
	Arch        int    // option 93, ArchNone when absent
	VendorClass string // option 60
	UserClass   string // option 77, joined
	IPXE        bool   // user class "iPXE" or option 175 present
	V6          bool   // asked over DHCPv6
}

func (c Client) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "mac=%s", c.MAC)
	if c.Arch != ArchNone {
		fmt.Fprintf(&b, " arch=%d", c.Arch)
	}
	if c.VendorClass != "" {
		fmt.Fprintf(&b, " vendor=%q", c.VendorClass)
	}
	if c.UserClass != "" {
		fmt.Fprintf(&b, " user=%q", c.UserClass)
	}
	if c.V6 {
		b.WriteString(" dhcpv6")
	}
	return b.String()
}

// Boot is the boot decision for one client.
type Boot struct {
	File     string // boot file name or URL (option 67 and the file field)
	RootPath string // option 17, if any
	Why      string // which rule chose File, for the timeline
}

// Policy decides what a client boots.
type Policy func(Client) Boot

// Network is where the servers listen: the lab's fabric host
// (*netfab.Fabric).
type Network interface {
	// ListenUDPBroadcast opens port on every IPv4 address, able to send to
	// and receive limited broadcast: DHCPv4 clients have no address yet.
	ListenUDPBroadcast(port uint16) (net.PacketConn, error)
	// ListenUDPGroup joins the IPv6 multicast group and opens port on the
	// host's NIC: DHCPv6 clients send to a group from link-local addresses.
	ListenUDPGroup(group netip.Addr, port uint16) (net.PacketConn, error)
}

// Config sets up a server.
type Config struct {
	Network   Network
	ServerIP  netip.Addr
	Subnet    netip.Prefix
	PoolStart netip.Addr // first address handed out; default .15 of the subnet
	LeaseTime time.Duration
	Policy    Policy
	Timeline  *timeline.Timeline
	// MTU, if set, is offered as the interface MTU (option 26).
	MTU int
	// ServerIP6 and Prefix6, when set, start DHCPv6 as well (Family says
	// which guests it answers); ServerMAC makes its DUID.
	ServerIP6 netip.Addr
	Prefix6   netip.Prefix
	ServerMAC net.HardwareAddr
}

// Server is a running DHCP server.
type Server struct {
	cfg  Config
	srv  *server4.Server
	srv6 *server6.Server
	duid dhcpv6.DUID

	mu     sync.Mutex
	leases map[string]netip.Addr
	silent map[string]bool
	family map[string]string
	next   netip.Addr
	done   chan struct{}
	done6  chan struct{}
}

// Start listens on UDP port 67 of the fabric host.
func Start(cfg Config) (*Server, error) {
	if cfg.LeaseTime == 0 {
		cfg.LeaseTime = time.Hour
	}
	if !cfg.PoolStart.IsValid() {
		a := cfg.Subnet.Masked().Addr().As4()
		a[3] = 15
		cfg.PoolStart = netip.AddrFrom4(a)
	}
	if cfg.Policy == nil {
		cfg.Policy = func(Client) Boot { return Boot{} }
	}
	conn, err := cfg.Network.ListenUDPBroadcast(dhcpv4.ServerPort)
	if err != nil {
		return nil, fmt.Errorf("dhcp: %w", err)
	}
	s := &Server{cfg: cfg, leases: map[string]netip.Addr{}, silent: map[string]bool{}, family: map[string]string{}, next: cfg.PoolStart, done: make(chan struct{}), done6: make(chan struct{})}
	srv, err := server4.NewServer("", nil, s.handle, server4.WithConn(conn))
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("dhcp: %w", err)
	}
	s.srv = srv
	go func() {
		defer close(s.done)
		srv.Serve()
	}()
	if cfg.ServerIP6.IsValid() {
		if err := s.startV6(); err != nil {
			s.Close()
			return nil, err
		}
	} else {
		close(s.done6)
	}
	return s, nil
}

// Close stops the server.
func (s *Server) Close() error {
	err := s.srv.Close()
	<-s.done
	if s.srv6 != nil {
		s.srv6.Close()
		<-s.done6
	}
	return err
}

// Ignore makes the server stay silent towards mac (the no-dhcp fault).
func (s *Server) Ignore(mac net.HardwareAddr, v bool) {
	s.mu.Lock()
	s.silent[mac.String()] = v
	s.mu.Unlock()
}

func (s *Server) ignored(mac net.HardwareAddr) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.silent[mac.String()]
}

// Lease returns (allocating if needed) the address of mac.
func (s *Server) Lease(mac net.HardwareAddr) (netip.Addr, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ip, ok := s.leases[mac.String()]; ok {
		return ip, nil
	}
	// From where the last lease left off to the pool's end, then from its
	// start again: addresses given back (Release) are used again last.
	for _, from := range []netip.Addr{s.next, s.cfg.PoolStart} {
		for ip := from; s.cfg.Subnet.Contains(ip) && !isBroadcast(s.cfg.Subnet, ip); ip = ip.Next() {
			if ip == s.cfg.ServerIP || s.taken(ip) {
				continue
			}
			s.leases[mac.String()] = ip
			s.next = ip.Next()
			return ip, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("dhcp: address pool of %s exhausted", s.cfg.Subnet)
}

// leaseOf is mac's lease, if it has one.
func (s *Server) leaseOf(mac net.HardwareAddr) (netip.Addr, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ip, ok := s.leases[mac.String()]
	return ip, ok
}

// Reserve leases ip to mac: a replay of a recorded boot gets the address
// the recorded guest had. It fails when ip is outside the pool's subnet,
// the server's own, or another MAC's.
func (s *Server) Reserve(mac net.HardwareAddr, ip netip.Addr) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ip == s.cfg.ServerIP || !s.cfg.Subnet.Contains(ip) || ip == s.cfg.Subnet.Masked().Addr() || isBroadcast(s.cfg.Subnet, ip) {
		return fmt.Errorf("dhcp: %s is not a client address in %s", ip, s.cfg.Subnet)
	}
	if cur, ok := s.leases[mac.String()]; ok && cur == ip {
		return nil
	}
	if s.taken(ip) {
		return fmt.Errorf("dhcp: %s is leased to another guest", ip)
	}
	s.leases[mac.String()] = ip
	return nil
}

// isBroadcast reports whether ip is the subnet's broadcast address.
func isBroadcast(subnet netip.Prefix, ip netip.Addr) bool {
	if !ip.Is4() {
		return false
	}
	a := ip.As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	host := uint32(1)<<(32-subnet.Bits()) - 1
	return v&host == host
}

func (s *Server) taken(ip netip.Addr) bool {
	for _, l := range s.leases {
		if l == ip {
			return true
		}
	}
	return false
}

// ClientOf reads the identifying options of a request.
func ClientOf(m *dhcpv4.DHCPv4) Client {
	c := Client{MAC: m.ClientHWAddr, Arch: ArchNone, VendorClass: m.ClassIdentifier()}
	if b := m.Options.Get(dhcpv4.OptionClientSystemArchitectureType); len(b) >= 2 {
		c.Arch = int(binary.BigEndian.Uint16(b))
	}
	if b := m.Options.Get(dhcpv4.OptionUserClassInformation); len(b) > 0 {
		// iPXE sends the bare string; RFC 3004 clients length-prefix it.
		uc := string(b)
		if int(b[0]) == len(b)-1 {
			uc = string(b[1:])
		}
		c.UserClass = uc
	}
	c.IPXE = c.UserClass == "iPXE" || len(m.Options.Get(dhcpv4.GenericOptionCode(175))) > 0
	return c
}

func (s *Server) handle(conn net.PacketConn, peer net.Addr, m *dhcpv4.DHCPv4) {
	defer guard.Recover("a DHCP message from "+peer.String(), func(what string, v any, stack []byte) {
		s.emit(timeline.Event{Kind: "panic", MAC: m.ClientHWAddr.String(), Msg: guard.Message(what, v), Detail: map[string]any{"stack": string(stack)}})
	})
	if m.OpCode != dhcpv4.OpcodeBootRequest {
		return
	}
	c := ClientOf(m)
	mac := m.ClientHWAddr.String()
	mt := m.MessageType()
	detail := map[string]any{"xid": m.TransactionID.String(), "client": c.String()}
	if s.ignored(m.ClientHWAddr) {
		detail["message"] = strings.ToLower(mt.String())
		s.emit(timeline.Event{Kind: "ignored", MAC: mac, Msg: "no-dhcp fault: " + mt.String(), Detail: detail})
		return
	}
	if s.familyOf(m.ClientHWAddr) == V6 {
		s.emit(timeline.Event{Kind: "unanswered", MAC: mac, Msg: mt.String() + " from a guest booting over IPv6 only"})
		return
	}
	// Only machines the lab leased an address to get one: a guest making
	// up MACs cannot drain the pool for the next (DHCP starvation).
	ip, ok := s.leaseOf(m.ClientHWAddr)
	if !ok {
		s.emit(timeline.Event{Kind: "refused", MAC: mac, Msg: "a MAC the lab has no guest for: " + mt.String(), Detail: detail})
		return
	}
	var reply dhcpv4.MessageType
	switch mt {
	case dhcpv4.MessageTypeDiscover:
		s.emit(timeline.Event{Kind: "discover", MAC: mac, Msg: c.String(), Detail: detail})
		reply = dhcpv4.MessageTypeOffer
	case dhcpv4.MessageTypeRequest:
		want := m.RequestedIPAddress()
		if want == nil || want.IsUnspecified() {
			want = m.ClientIPAddr
		}
		if sid := m.ServerIdentifier(); sid != nil && !sid.Equal(net.IP(s.cfg.ServerIP.AsSlice())) {
			return // the client chose another server
		}
		if w, ok := netip.AddrFromSlice(want.To4()); !ok || w != ip {
			s.emit(timeline.Event{Kind: "nak", MAC: mac, Msg: fmt.Sprintf("requested %v, lease is %v", want, ip), Detail: detail})
			s.send(conn, peer, m, dhcpv4.MessageTypeNak, ip, Boot{})
			return
		}
		s.emit(timeline.Event{Kind: "request", MAC: mac, Msg: c.String(), Detail: detail})
		reply = dhcpv4.MessageTypeAck
	default:
		return
	}
	boot := s.cfg.Policy(c)
	detail["ip"] = ip.String()
	detail["bootfile"] = boot.File
	if boot.Why != "" {
		detail["why"] = boot.Why
	}
	if boot.RootPath != "" {
		detail["rootpath"] = boot.RootPath
	}
	if err := s.send(conn, peer, m, reply, ip, boot); err != nil {
		s.emit(timeline.Event{Kind: "error", MAC: mac, Msg: err.Error()})
		return
	}
	kind := "offer"
	if reply == dhcpv4.MessageTypeAck {
		kind = "ack"
	}
	s.emit(timeline.Event{Kind: kind, MAC: mac, Msg: fmt.Sprintf("%s boot=%q", ip, boot.File), Detail: detail})
}

func (s *Server) send(conn net.PacketConn, peer net.Addr, m *dhcpv4.DHCPv4, mt dhcpv4.MessageType, ip netip.Addr, boot Boot) error {
	server := net.IP(s.cfg.ServerIP.AsSlice())
	mods := []dhcpv4.Modifier{
		dhcpv4.WithMessageType(mt),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(server)),
	}
	if mt != dhcpv4.MessageTypeNak {
		mods = append(mods,
			dhcpv4.WithYourIP(net.IP(ip.AsSlice())),
			dhcpv4.WithServerIP(server),
			dhcpv4.WithNetmask(net.CIDRMask(s.cfg.Subnet.Bits(), 32)),
			dhcpv4.WithLeaseTime(uint32(s.cfg.LeaseTime/time.Second)),
			dhcpv4.WithOption(dhcpv4.OptRouter(server)),
			dhcpv4.WithOption(dhcpv4.OptTFTPServerName(s.cfg.ServerIP.String())),
		)
		if boot.File != "" {
			mods = append(mods, dhcpv4.WithOption(dhcpv4.OptBootFileName(boot.File)))
		}
		if boot.RootPath != "" {
			mods = append(mods, dhcpv4.WithOption(dhcpv4.OptRootPath(boot.RootPath)))
		}
		if s.cfg.MTU > 0 {
			mods = append(mods, dhcpv4.WithGeneric(dhcpv4.OptionInterfaceMTU, []byte{byte(s.cfg.MTU >> 8), byte(s.cfg.MTU)}))
		}
		if c := ClientOf(m); c.IPXE {
			// Option 175, encapsulated 176 (no-pxedhcp) = 1: iPXE then does not
			// wait ~3 s for ProxyDHCP offers.
			mods = append(mods, dhcpv4.WithGeneric(dhcpv4.GenericOptionCode(175), []byte{176, 1, 1}))
		}
		// No option 60 "PXEClient" in replies: UEFI firmware then expects
		// PXE boot-server discovery (option 43, port 4011) and, finding
		// none, rejects the offer (PXE-E16). UEFI HTTP boot clients, on the
		// other hand, take only offers that say "HTTPClient" back.
		if strings.HasPrefix(m.ClassIdentifier(), "HTTPClient") {
			mods = append(mods, dhcpv4.WithOption(dhcpv4.OptClassIdentifier("HTTPClient")))
		}
	}
	resp, err := dhcpv4.NewReplyFromRequest(m, mods...)
	if err != nil {
		return fmt.Errorf("dhcp: build reply: %w", err)
	}
	if boot.File != "" {
		resp.BootFileName = boot.File
	}
	_, err = conn.WriteTo(resp.ToBytes(), peer)
	return err
}

func (s *Server) emit(e timeline.Event) {
	e.Source = "dhcp"
	s.cfg.Timeline.Emit(e)
}
