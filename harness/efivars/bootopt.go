package efivars

import (
	"encoding/binary"
	"fmt"
	"net"
	"strings"
	"unicode/utf16"
)

// A device path is a list of nodes (UEFI 2.10, chapter 10): type, subtype,
// length, body; the list ends with an end node.

func node(typ, sub byte, body ...byte) []byte {
	n := []byte{typ, sub, 0, 0}
	binary.LittleEndian.PutUint16(n[2:], uint16(4+len(body)))
	return append(n, body...)
}

// NICPath is the device path of a virtio NIC at PCI device dev, function 0,
// of the first root bridge, with the MAC address node firmware puts under
// it: PciRoot(0x0)/Pci(dev,0x0)/MAC(mac,0x1).
func NICPath(dev byte, mac net.HardwareAddr) []byte {
	var p []byte
	acpi := make([]byte, 8)
	binary.LittleEndian.PutUint32(acpi, 0x0a0341d0) // PNP0A03, a PCI root bridge
	p = append(p, node(2, 1, acpi...)...)
	p = append(p, node(1, 1, 0, dev)...) // function, device
	m := make([]byte, 33)
	copy(m, mac)
	m[32] = 1 // Ethernet
	return append(p, node(3, 11, m...)...)
}

// IPv6Node is IPv6(::,0x0,Static,::,0x40,::): the node network boot options
// of EDK2 carry for IPv6, everything left to DHCPv6.
func IPv6Node() []byte {
	b := make([]byte, 56)
	b[39] = 0x40 // prefix length; addresses, ports, protocol, origin zero
	return node(3, 13, b...)
}

// URINode is Uri(): a boot option's empty URI, which makes it UEFI HTTP boot
// (the URL comes from DHCP).
func URINode() []byte { return node(3, 24) }

// End ends a device path.
func End() []byte { return node(0x7f, 0xff) }

// LoadOption is an EFI_LOAD_OPTION, active, for a Boot#### variable.
func LoadOption(description string, path []byte) []byte {
	b := binary.LittleEndian.AppendUint32(nil, 1) // LOAD_OPTION_ACTIVE
	b = binary.LittleEndian.AppendUint16(b, uint16(len(path)))
	for _, r := range utf16.Encode([]rune(description)) {
		b = binary.LittleEndian.AppendUint16(b, r)
	}
	return append(append(b, 0, 0), path...)
}

// NetBootDescription is EDK2's own description of a NIC's network boot
// options ("UEFI PXEv6 (MAC:5254004E4201)"), which it matches options by.
func NetBootDescription(kind string, mac net.HardwareAddr) string {
	return fmt.Sprintf("UEFI %s (MAC:%s)", kind, strings.ToUpper(strings.ReplaceAll(mac.String(), ":", "")))
}

// SetBootOrder writes the boot options opts as Boot0010, Boot0011, ... and
// puts them first in BootOrder, before whatever it held.
func (s *Store) SetBootOrder(opts ...[]byte) error {
	var order []byte
	for i, o := range opts {
		n := uint16(0x10 + i)
		if err := s.Set(Variable{Name: fmt.Sprintf("Boot%04X", n), GUID: globalVariable,
			Attributes: NonVolatile | BootserviceAccess | RuntimeAccess, Data: o}); err != nil {
			return err
		}
		order = binary.LittleEndian.AppendUint16(order, n)
	}
	if old, ok := s.Get("BootOrder", globalVariable); ok {
		order = append(order, old...)
	}
	return s.Set(Variable{Name: "BootOrder", GUID: globalVariable,
		Attributes: NonVolatile | BootserviceAccess | RuntimeAccess, Data: order})
}
