package qemu

import (
	"fmt"
	"sort"
	"strings"
)

// NIC is a network card model QEMU emulates, as nbh names it (--nic).
type NIC struct {
	Name   string // nbh's name: virtio, e1000, ...
	Device string // QEMU's -device name
	// ROMFile is the iPXE option ROM QEMU loads for it by default (from
	// Debian's ipxe-qemu); ROM says it has one (SeaBIOS boots through it),
	// EFI that the ROM holds an EFI driver too (OVMF boots through it):
	// QEMU 7.2 gives ne2k_pci and the eepro100 family legacy ROMs only.
	ROMFile  string
	ROM, EFI bool
	// Driver is the Linux module that drives it.
	Driver string
}

// VirtioNIC is the default NIC.
const VirtioNIC = "virtio"

// nics are the NIC models nbh boots, virtio first.
var nics = []NIC{
	{Name: VirtioNIC, Device: "virtio-net-pci", ROMFile: "efi-virtio.rom", ROM: true, EFI: true, Driver: "virtio_net"},
	{Name: "e1000", Device: "e1000", ROMFile: "efi-e1000.rom", ROM: true, EFI: true, Driver: "e1000"},
	{Name: "e1000e", Device: "e1000e", ROMFile: "efi-e1000e.rom", ROM: true, EFI: true, Driver: "e1000e"},
	{Name: "rtl8139", Device: "rtl8139", ROMFile: "efi-rtl8139.rom", ROM: true, EFI: true, Driver: "8139too"},
	{Name: "vmxnet3", Device: "vmxnet3", ROMFile: "efi-vmxnet3.rom", ROM: true, EFI: true, Driver: "vmxnet3"},
	{Name: "pcnet", Device: "pcnet", ROMFile: "efi-pcnet.rom", ROM: true, EFI: true, Driver: "pcnet32"},
	{Name: "ne2k_pci", Device: "ne2k_pci", ROMFile: "pxe-ne2k_pci.rom", ROM: true, Driver: "ne2k_pci"},
	{Name: "i82559er", Device: "i82559er", ROMFile: "pxe-eepro100.rom", ROM: true, Driver: "e100"},
}

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
