package dhcp

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/insomniacslk/dhcp/dhcpv6"
	"github.com/insomniacslk/dhcp/dhcpv6/server6"
	"github.com/insomniacslk/dhcp/iana"

	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/internal/guard"
	"nbh.dev/nbh/internal/rules"
)

// IP families a guest boots over (Family).
const (
	V4   = "4"
	V6   = "6"
	Dual = "dual"
)

// Family sets which of the servers answer mac: DHCPv4 unless V6, DHCPv6
// for V6 and Dual. (A guest on IPv4 alone gets no DHCPv6 answer, as on a
// network without a DHCPv6 server: UEFI PXE's IPv6 attempt then runs out.)
func (s *Server) Family(mac net.HardwareAddr, family string) {
	s.mu.Lock()
	s.family[mac.String()] = family
	s.mu.Unlock()
}

func (s *Server) familyOf(mac net.HardwareAddr) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f := s.family[mac.String()]; f != "" {
		return f
	}
	return V4
}

// Lease6 is mac's IPv6 address: its IPv4 lease's last byte, written in
// decimal, as the interface ID on the lab's prefix (10.0.2.15 is ::15),
// so the two addresses of one guest read alike.
func (s *Server) Lease6(mac net.HardwareAddr) (netip.Addr, error) {
	ip4, err := s.Lease(mac)
	if err != nil {
		return netip.Addr{}, err
	}
	return v6For(s.cfg.Prefix6, ip4), nil
}

func v6For(prefix netip.Prefix, ip4 netip.Addr) netip.Addr {
	last := ip4.As4()[3]
	id, _ := strconv.ParseUint(strconv.Itoa(int(last)), 16, 16)
	a := prefix.Masked().Addr().As16()
	binary.BigEndian.PutUint16(a[14:], uint16(id))
	return netip.AddrFrom16(a)
}

// startV6 serves DHCPv6 on UDP port 547 of the fabric host, joined to the
// All_DHCP_Relay_Agents_and_Servers group.
func (s *Server) startV6() error {
	group := netip.AddrFrom16([16]byte(dhcpv6.AllDHCPRelayAgentsAndServers.To16()))
	conn, err := s.cfg.Network.ListenUDPGroup(group, dhcpv6.DefaultServerPort)
	if err != nil {
		return fmt.Errorf("dhcp6: %w", err)
	}
	srv, err := server6.NewServer("", nil, s.handle6, server6.WithConn(conn))
	if err != nil {
		conn.Close()
		return fmt.Errorf("dhcp6: %w", err)
	}
	s.srv6 = srv
	s.duid = &dhcpv6.DUIDLL{HWType: iana.HWTypeEthernet, LinkLayerAddr: s.cfg.ServerMAC}
	go func() {
		defer close(s.done6)
		srv.Serve()
	}()
	return nil
}

// ClientOf6 reads what a DHCPv6 message tells of its sender: the MAC from
// the EUI-64 link-local address it speaks from (firmware, iPXE and Linux
// all use one; the switch lets a port speak from its own only), the
// architecture (option 61), the vendor class data (option 16:
// "PXEClient:…", "HTTPClient:…") and user class. Never the MAC of its
// DUID: a client's word, which could name another guest.
func ClientOf6(peer net.Addr, m *dhcpv6.Message) Client {
	c := Client{Arch: ArchNone, V6: true}
	if u, ok := peer.(*net.UDPAddr); ok {
		c.MAC = macOfLinkLocal(u.IP)
	}
	if c.MAC == nil && !rules.On(rules.DHCPv6Identity) {
		switch d := m.Options.ClientID().(type) {
		case *dhcpv6.DUIDLL:
			c.MAC = d.LinkLayerAddr
		case *dhcpv6.DUIDLLT:
			c.MAC = d.LinkLayerAddr
		}
	}
	if a := m.Options.ArchTypes(); len(a) > 0 {
		c.Arch = int(a[0])
	}
	for _, vc := range m.Options.VendorClasses() {
		for _, d := range vc.Data {
			if c.VendorClass == "" {
				c.VendorClass = string(d)
			}
		}
	}
	var ucs []string
	for _, uc := range m.Options.UserClasses() {
		ucs = append(ucs, string(uc))
	}
	c.UserClass = strings.Join(ucs, ",")
	c.IPXE = c.UserClass == "iPXE"
	return c
}

// macOfLinkLocal undoes the EUI-64 of a link-local address.
func macOfLinkLocal(ip net.IP) net.HardwareAddr {
	ip = ip.To16()
	if ip == nil || !ip.IsLinkLocalUnicast() || ip[11] != 0xff || ip[12] != 0xfe {
		return nil
	}
	return net.HardwareAddr{ip[8] ^ 2, ip[9], ip[10], ip[13], ip[14], ip[15]}
}

func (s *Server) handle6(conn net.PacketConn, peer net.Addr, d dhcpv6.DHCPv6) {
	defer guard.Recover("a DHCPv6 message from "+peer.String(), func(what string, v any, stack []byte) {
		s.emit(timeline.Event{Kind: "panic", Msg: guard.Message(what, v), Detail: map[string]any{"stack": string(stack)}})
	})
	m, ok := d.(*dhcpv6.Message)
	if !ok {
		return // relayed: the lab's segment has no relay
	}
	c := ClientOf6(peer, m)
	if c.MAC == nil {
		s.emit(timeline.Event{Kind: "refused", Addr: peer.String(), Msg: "DHCPv6 " + m.MessageType.String() + " from no known link-layer address",
			Detail: map[string]any{"xid": m.TransactionID.String(), "v6": true}})
		return
	}
	mac := c.MAC.String()
	mt := m.MessageType
	detail := map[string]any{"xid": m.TransactionID.String(), "client": c.String(), "v6": true, "peer": peer.String()}
	if s.ignored(c.MAC) {
		detail["message"] = strings.ToLower(mt.String())
		s.emit(timeline.Event{Kind: "ignored", MAC: mac, Msg: "no-dhcp fault: DHCPv6 " + mt.String(), Detail: detail})
		return
	}
	if f := s.familyOf(c.MAC); f == V4 {
		s.emit(timeline.Event{Kind: "unanswered", MAC: mac, Msg: "DHCPv6 " + mt.String() + " from a guest booting over IPv4", Detail: detail})
		return
	}
	if _, ok := s.leaseOf(c.MAC); !ok {
		s.emit(timeline.Event{Kind: "refused", MAC: mac, Msg: "a MAC the lab has no guest for: DHCPv6 " + mt.String(), Detail: detail})
		return
	}
	ip, err := s.Lease6(c.MAC)
	if err != nil {
		return
	}
	if sid := m.Options.ServerID(); sid != nil && !sid.Equal(s.duid) {
		return // the client chose another server
	}
	boot := s.cfg.Policy(c)
	file := boot.File
	if file != "" && !strings.Contains(file, "://") {
		// DHCPv6 names boot files by URL only (option 59).
		file = "tftp://[" + s.cfg.ServerIP6.String() + "]/" + strings.TrimLeft(file, "/")
	}
	mods := []dhcpv6.Modifier{dhcpv6.WithServerID(s.duid)}
	if file != "" {
		mods = append(mods, dhcpv6.WithOption(dhcpv6.OptBootFileURL(file)))
	}
	if strings.HasPrefix(c.VendorClass, "HTTPClient") {
		// UEFI HTTP boot takes only answers that say HTTPClient back.
		mods = append(mods, dhcpv6.WithOption(&dhcpv6.OptVendorClass{EnterpriseNumber: 343, Data: [][]byte{[]byte("HTTPClient")}}))
	}
	var kind string
	var resp *dhcpv6.Message
	switch mt {
	case dhcpv6.MessageTypeSolicit, dhcpv6.MessageTypeRequest, dhcpv6.MessageTypeRenew, dhcpv6.MessageTypeRebind:
		if ia := m.Options.OneIANA(); ia != nil {
			// The client's own IAID back: a client matches the answer by it.
			mods = append(mods, dhcpv6.WithIAID(ia.IaId), dhcpv6.WithIANA(dhcpv6.OptIAAddress{
				IPv6Addr: net.IP(ip.AsSlice()), PreferredLifetime: s.cfg.LeaseTime, ValidLifetime: s.cfg.LeaseTime}))
		}
		if mt == dhcpv6.MessageTypeSolicit && m.GetOneOption(dhcpv6.OptionRapidCommit) == nil {
			// Preference 255: the client takes this server at once
			// instead of collecting advertisements for a second.
			mods = append(mods, dhcpv6.WithPreference(255))
			s.emit(timeline.Event{Kind: "solicit", MAC: mac, Msg: c.String(), Detail: detail})
			resp, err = dhcpv6.NewAdvertiseFromSolicit(m, mods...)
			kind = "advertise"
			break
		}
		s.emit(timeline.Event{Kind: strings.ToLower(mt.String()), MAC: mac, Msg: c.String(), Detail: detail})
		resp, err = dhcpv6.NewReplyFromMessage(m, mods...)
		kind = "reply"
	case dhcpv6.MessageTypeConfirm, dhcpv6.MessageTypeInformationRequest, dhcpv6.MessageTypeRelease, dhcpv6.MessageTypeDecline:
		resp, err = dhcpv6.NewReplyFromMessage(m, mods...)
		kind = "reply"
	default:
		return
	}
	if err != nil {
		s.emit(timeline.Event{Kind: "error", MAC: mac, Msg: "dhcp6: " + err.Error()})
		return
	}
	detail["ip"] = ip.String()
	detail["bootfile"] = file
	if boot.Why != "" {
		detail["why"] = boot.Why
	}
	if _, err := conn.WriteTo(resp.ToBytes(), peer); err != nil {
		s.emit(timeline.Event{Kind: "error", MAC: mac, Msg: "dhcp6: " + err.Error()})
		return
	}
	s.emit(timeline.Event{Kind: kind, MAC: mac, Msg: fmt.Sprintf("%s boot=%q", ip, file), Detail: detail})
}
