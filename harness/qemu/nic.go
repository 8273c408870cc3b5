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
	// ROM: QEMU carries an iPXE option ROM for it (Debian's ipxe-qemu,
	// efi-*.rom), so firmware that boots through the NIC's ROM (SeaBIOS,
	// OVMF with the iPXE EFI driver) can boot from it.
	ROM bool
	// Driver is the Linux module that drives it.
	Driver string
}

// VirtioNIC is the default NIC.
const VirtioNIC = "virtio"

// nics are the NIC models nbh boots, virtio first.
var nics = []NIC{
	{Name: VirtioNIC, Device: "virtio-net-pci", ROM: true, Driver: "virtio_net"},
	{Name: "e1000", Device: "e1000", ROM: true, Driver: "e1000"},
	{Name: "e1000e", Device: "e1000e", ROM: true, Driver: "e1000e"},
	{Name: "rtl8139", Device: "rtl8139", ROM: true, Driver: "8139too"},
	{Name: "vmxnet3", Device: "vmxnet3", ROM: true, Driver: "vmxnet3"},
	{Name: "pcnet", Device: "pcnet", ROM: true, Driver: "pcnet32"},
	{Name: "ne2k_pci", Device: "ne2k_pci", ROM: true, Driver: "ne2k_pci"},
	{Name: "i82559er", Device: "i82559er", ROM: true, Driver: "e100"},
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
