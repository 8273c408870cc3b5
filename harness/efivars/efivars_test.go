package efivars

import (
	"encoding/hex"
	"net"
	"testing"

	"gotest.tools/v3/assert"
)

// What Debian 12's AAVMF (2022.11) wrote into a blank AAVMF_VARS.fd on its
// first boot: the volume and store headers, and the working block header.
const (
	aavmfHeaders = "00000000000000000000000000000000" + "8d2bf1ff96768b4ca9852747075b4f50" +
		"00000c0000000000" + "5f465648" + "360e0000" + "4800f8f800000002" + "0001000000000400" + "0000000000000000" +
		"782cf3aa7b949a43a1802e144ec37792" + "b8ff0300" + "5afe000000000000"
	aavmfWorkingBlock = "2b29589e687c7d49a0ce6500fd9f1b95" + "5be7c686" + "feffffff" + "e0ff030000000000"
)

func TestFormatAsTheFirmwareDoes(t *testing.T) {
	b := make([]byte, 1<<20)
	assert.NilError(t, Format(b))
	assert.Equal(t, hex.EncodeToString(b[:0x64]), aavmfHeaders)
	assert.Equal(t, hex.EncodeToString(b[armVirtBlock:armVirtBlock+32]), aavmfWorkingBlock)
	assert.Equal(t, b[0x64], byte(0xff), "the store is not erased")
	assert.Equal(t, b[ArmVirtVolume-1], byte(0xff))
	assert.Equal(t, b[ArmVirtVolume], byte(0), "formatted past the variable store's volume")
	assert.ErrorContains(t, Format(b), "not blank")
	s, err := Open(b)
	assert.NilError(t, err)
	vars, err := s.Vars()
	assert.NilError(t, err)
	assert.Equal(t, len(vars), 0)
	_, err = Open(make([]byte, 1<<20))
	assert.ErrorContains(t, err, "Format it first")
}

func TestSetReplacesAndOrders(t *testing.T) {
	b := make([]byte, 1<<20)
	assert.NilError(t, Format(b))
	s, err := Open(b)
	assert.NilError(t, err)
	assert.NilError(t, s.Set(Variable{Name: "BootOrder", GUID: globalVariable, Attributes: 7, Data: []byte{0, 0, 1, 0}}))
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x4e, 0x42, 1}
	nic := NICPath(1, mac)
	assert.NilError(t, s.SetBootOrder(
		LoadOption(NetBootDescription("PXEv6", mac), append(append(nic, IPv6Node()...), End()...)),
		LoadOption(NetBootDescription("HTTPv6", mac), append(append(append(nic, IPv6Node()...), URINode()...), End()...))))
	order, ok := s.Get("BootOrder", globalVariable)
	assert.Assert(t, ok)
	assert.DeepEqual(t, order, []byte{0x10, 0, 0x11, 0, 0, 0, 1, 0})
	// The boot option AAVMF took and booted by (PciRoot(0x0)/Pci(0x1,0x0)/
	// MAC(5254004E4201,0x1)/IPv6(::,0x0,Static,::,0x40,::)/Uri()).
	http, ok := s.Get("Boot0011", globalVariable)
	assert.Assert(t, ok)
	assert.Equal(t, hex.EncodeToString(http), "010000007b00"+hex.EncodeToString(encodeName("UEFI HTTPv6 (MAC:5254004E4201)"))+
		"02010c00d041030a00000000"+"01010600"+"0001"+"030b2500"+"5254004e4201"+"0000000000000000000000000000000000000000000000000000"+"01"+
		"030d3c00"+"0000000000000000000000000000000000000000000000000000000000000000"+"000000000000"+"0040"+"00000000000000000000000000000000"+
		"03180400"+"7fff0400")
	vars, err := s.Vars()
	assert.NilError(t, err)
	var names []string
	for _, v := range vars {
		names = append(names, v.Name)
	}
	assert.DeepEqual(t, names, []string{"Boot0010", "Boot0011", "BootOrder"}) // the first BootOrder is deleted
	s2, err := Open(b)                                                        // what the firmware reads back
	assert.NilError(t, err)
	again, _ := s2.Get("BootOrder", globalVariable)
	assert.DeepEqual(t, again, order)
}

func TestParseGUID(t *testing.T) {
	g, err := ParseGUID("8BE4DF61-93CA-11D2-AA0D-00E098032B8C")
	assert.NilError(t, err)
	assert.Equal(t, hex.EncodeToString(g[:]), "61dfe48bca93d211aa0d00e098032b8c")
	_, err = ParseGUID("not-a-guid")
	assert.ErrorContains(t, err, "GUID")
}
