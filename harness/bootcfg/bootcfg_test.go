package bootcfg

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"strings"
	"testing"

	"gotest.tools/v3/assert"
)

func TestUBootImageHeader(t *testing.T) {
	img := UBootImage("nbh", "echo hi\n")
	be := binary.BigEndian
	assert.Equal(t, be.Uint32(img), uint32(0x27051956))
	hdr := append([]byte(nil), img[:64]...)
	want := be.Uint32(hdr[4:])
	be.PutUint32(hdr[4:], 0)
	assert.Equal(t, crc32.ChecksumIEEE(hdr), want, "header CRC")
	data := img[64:]
	assert.Equal(t, int(be.Uint32(img[12:])), len(data))
	assert.Equal(t, crc32.ChecksumIEEE(data), be.Uint32(img[24:]), "data CRC")
	assert.Equal(t, img[30], byte(6), "type script")
	assert.Equal(t, be.Uint32(data), uint32(len("echo hi\n")))
	assert.Equal(t, string(data[8:]), "echo hi\n")
}

func TestUBootEnvKeepsDefaultsAndOverrides(t *testing.T) {
	bin := []byte("junk\x00bootcmd=run distro_bootcmd\x00bootdelay=2\x00kernel_addr_r=0x40400000\x00\x00more junk")
	env, err := UBootEnv(bin, map[string]string{"bootdelay": "0", "ethaddr": "52:54:00:4e:42:01"})
	assert.NilError(t, err)
	assert.Equal(t, len(env), UBootEnvSize)
	assert.Equal(t, binary.LittleEndian.Uint32(env), crc32.ChecksumIEEE(env[4:]))
	vars := strings.Split(string(bytes.TrimRight(env[4:], "\x00")), "\x00")
	assert.DeepEqual(t, vars, []string{"bootcmd=run distro_bootcmd", "bootdelay=0", "kernel_addr_r=0x40400000", "ethaddr=52:54:00:4e:42:01"})
	_, err = UBootEnv([]byte("no environment here"), nil)
	assert.ErrorContains(t, err, "no default environment")
}

func TestConfigsNameTheFiles(t *testing.T) {
	b := Boot{Server: "10.0.2.2", Kernel: "g1/vmlinuz", Initrd: "g1/initrd.img", Cmdline: "console=ttyS0"}
	s := IPXEScript(b)
	assert.Assert(t, strings.HasPrefix(s, "#!ipxe\n"))
	assert.Assert(t, strings.Contains(s, "kernel http://10.0.2.2/g1/vmlinuz initrd=initrd.img console=ttyS0 || goto failed"))
	assert.Assert(t, strings.Contains(PXELinux(b), "\tkernel g1/vmlinuz\n\tinitrd g1/initrd.img\n\tappend console=ttyS0\n"))
	assert.Assert(t, strings.Contains(GRUBConfig(b), "linux (http,10.0.2.2)/g1/vmlinuz console=ttyS0\n"))
}
