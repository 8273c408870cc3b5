package bootcfg

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"os"
	"path/filepath"
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

// TestTemplateErrorsNameFileAndLine: a user's template that does not parse,
// or uses a field Boot lacks, fails before any boot, naming file and line.
func TestTemplateErrorsNameFileAndLine(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "boot.ipxe")
	assert.NilError(t, os.WriteFile(bad, []byte("#!ipxe\necho ok\nkernel {{.KernelURL}\n"), 0o644))
	_, err := ReadTemplate(bad)
	assert.ErrorContains(t, err, bad+":3:")
	field := filepath.Join(dir, "field.ipxe")
	assert.NilError(t, os.WriteFile(field, []byte("#!ipxe\n\necho {{.NoSuchField}}\n"), 0o644))
	_, err = ReadTemplate(field)
	assert.ErrorContains(t, err, field+":3:")
	assert.ErrorContains(t, err, "NoSuchField")
}

// TestUserTemplateSeesEveryField: the fields the help and README document
// all render.
func TestUserTemplateSeesEveryField(t *testing.T) {
	p := filepath.Join(t.TempDir(), "all.ipxe")
	text := "{{.Server}} {{.Guest}} {{.MAC}} {{.IP}} {{.Arch}} {{.Firmware}} {{.Kernel}} {{.Initrd}} {{.KernelURL}} {{.InitrdURL}} {{.Cmdline}} {{.Root}} {{.RootPath}} {{.SAN.URI}} {{.URL \"x/y\"}}"
	assert.NilError(t, os.WriteFile(p, []byte(text), 0o644))
	tpl, err := ReadTemplate(p)
	assert.NilError(t, err)
	out, err := tpl.Execute(Boot{Server: "10.0.2.2", Guest: "g7", MAC: "52:54:00:00:00:07", IP: "10.0.2.21", Arch: "arm64", Firmware: "uboot",
		Kernel: "g7/vmlinuz", Initrd: "g7/initrd.img", Cmdline: "quiet", Root: "nfs", RootPath: "10.0.2.2:/nbh/root", SAN: &SANBoot{URI: "iscsi:z"}})
	assert.NilError(t, err)
	assert.Equal(t, out, "10.0.2.2 g7 52:54:00:00:00:07 10.0.2.21 arm64 uboot g7/vmlinuz g7/initrd.img http://10.0.2.2/g7/vmlinuz http://10.0.2.2/g7/initrd.img quiet nfs 10.0.2.2:/nbh/root iscsi:z http://10.0.2.2/x/y")
}

// TestTemplateLimits: a template cannot loop for as long as it likes, nor
// write without end.
func TestTemplateLimits(t *testing.T) {
	_, err := ParseTemplate("loop.ipxe", "#!ipxe\n{{if .Guest}}\n{{range 1000000000}}x{{end}}{{end}}\n")
	assert.ErrorContains(t, err, "loop.ipxe:3:")
	assert.ErrorContains(t, err, "{{range}} is not supported")
	tpl, err := ParseTemplate("big.ipxe", `{{define "a"}}{{.Cmdline}}{{.Cmdline}}{{.Cmdline}}{{.Cmdline}}{{end}}`+
		`{{define "b"}}{{template "a" .}}{{template "a" .}}{{template "a" .}}{{template "a" .}}{{end}}`+
		`{{define "c"}}{{template "b" .}}{{template "b" .}}{{template "b" .}}{{template "b" .}}{{end}}`+
		`{{template "c" .}}{{template "c" .}}{{template "c" .}}{{template "c" .}}`)
	assert.NilError(t, err)
	_, err = tpl.Execute(Boot{Cmdline: strings.Repeat("x", 8192)})
	assert.ErrorContains(t, err, "output of more than")
	_, err = ParseTemplate("huge.ipxe", strings.Repeat("#", MaxTemplate+1))
	assert.ErrorContains(t, err, "more than")
}
