package qemu

import (
	"fmt"
	"sort"
	"strings"
)

// NIC is a network card model QEMU emulates, as nbh names it (--nic). Each
// has an iPXE option ROM QEMU loads by default (DefaultROM), through which
// SeaBIOS boots, and OVMF too when the ROM holds an EFI driver.
type NIC struct {
	Name   string // nbh's name: virtio, e1000, ...
	Device string // QEMU's -device name
	// Driver is the Linux module that drives it.
	Driver string
}

// VirtioNIC is the default NIC.
const VirtioNIC = "virtio"

// nics are the NIC models nbh boots, virtio first.
var nics = []NIC{
	{Name: VirtioNIC, Device: "virtio-net-pci", Driver: "virtio_net"},
	{Name: "e1000", Device: "e1000", Driver: "e1000"},
	{Name: "e1000e", Device: "e1000e", Driver: "e1000e"},
	{Name: "rtl8139", Device: "rtl8139", Driver: "8139too"},
	{Name: "vmxnet3", Device: "vmxnet3", Driver: "vmxnet3"},
	{Name: "pcnet", Device: "pcnet", Driver: "pcnet32"},
	{Name: "ne2k_pci", Device: "ne2k_pci", Driver: "ne2k_pci"},
	{Name: "i82559er", Device: "i82559er", Driver: "e100"},
}

// ROMHasEFI reports whether the option ROM file named holds an EFI driver
// beside the legacy one: ipxe-qemu names such a combined image efi-*.rom
// and a legacy-only one pxe-*.rom (TestNICROMs reads the pinned ROMs'
// image headers to hold this).
func ROMHasEFI(name string) bool { return strings.HasPrefix(name, "efi-") }

// NICs lists the NIC models, virtio first.
func NICs() []NIC { return append([]NIC(nil), nics...) }

// NICNames are the models' names, virtio first.
func NICNames() []string {
	out := make([]string, len(nics))
	for i, n := range nics {
		out[i] = n.Name
	}
	return out
}

// LookupNIC finds a NIC model by nbh's name ("" is virtio).
func LookupNIC(name string) (NIC, error) {
	if name == "" {
		name = VirtioNIC
	}
	for _, n := range nics {
		if n.Name == name {
			return n, nil
		}
	}
	names := NICNames()
	sort.Strings(names[1:])
	return NIC{}, fmt.Errorf("NIC %q: want one of %s", name, strings.Join(names, ", "))
}
