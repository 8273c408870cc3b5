// Package bootcfg writes the boot loaders' configuration: an iPXE script, a
// U-Boot boot script (in a legacy image header, as U-Boot's "source" wants
// it) and a pxelinux-style config, a grub.cfg, and a GRUB netboot EFI image
// for arm64 UEFI. Every config prints an "nbh:" line when it runs, so the
// console shows which loader got how far.
package bootcfg

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"text/template"
	"text/template/parse"
)

// Boot is what a loader must load. It is also what a loader configuration
// template sees (Template): its fields and methods are the documented
// template fields.
type Boot struct {
	Server  string // the boot server's address, as a URL host (IPv6 in brackets)
	Kernel  string // path on the server, e.g. g1/vmlinuz
	Initrd  string
	Cmdline string // the kernel command line
	// NFS, if set, makes the loader read Kernel and Initrd from this NFS
	// export of the server (the root file system itself) instead of over
	// HTTP or TFTP: iPXE with nfs:// URLs, U-Boot with its nfs command.
	NFS string
	// TFTP makes the loader fetch kernel and archive over TFTP: iPXE on a
	// network with no HTTP server (QEMU's user-mode network), Debian's
	// signed GRUB netboot image (it has no HTTP built in, and loads no
	// module under Secure Boot).
	TFTP bool
	// SAN, if set, makes iPXE boot from an iSCSI disk instead of kernel
	// and archive (the iPXE script only).
	SAN *SANBoot

	// What the templates may also use: the guest and its chain.
	Guest    string // the guest's name, e.g. g1
	MAC      string // its Ethernet address, 52:54:00:4e:42:01
	IP       string // its leased address
	Arch     string // amd64, arm64 or riscv64
	Firmware string // the chain, e.g. seabios-ipxe
	// Root is the root the command line names: "" (none), nfs, iscsi or
	// sanboot; RootPath its location (SERVER:/PATH for NFS, the iscsi: URI).
	Root, RootPath string
}

// URL is where the loader fetches path of the boot server (a path such as
// Kernel): http://SERVER/PATH, or tftp:// or nfs:// as the boot says.
func (b Boot) URL(path string) string {
	switch {
	case b.NFS != "":
		return "nfs://" + b.Server + b.NFS + "/" + path
	case b.TFTP:
		return "tftp://" + b.Server + "/" + path
	}
	return "http://" + b.Server + "/" + path
}

// KernelURL is URL(Kernel).
func (b Boot) KernelURL() string { return b.URL(b.Kernel) }

// InitrdURL is URL(Initrd).
func (b Boot) InitrdURL() string { return b.URL(b.Initrd) }

// SANBoot is an iSCSI disk for iPXE's sanboot.
type SANBoot struct {
	URI        string // iscsi:SERVER::PORT:LUN:IQN, iPXE's root-path spelling
	Initiator  string // the initiator's IQN
	User       string // CHAP, when the target requires it
	Password   string
	NoDescribe bool // boot without describing the disk in the iBFT
}

// IPXETemplate is the default iPXE script: kernel and archive over HTTP
// (or NFS, or TFTP), or a SAN boot: iPXE logs in, hooks the disk into the
// firmware, describes it in the iBFT (initiator, NIC, target, CHAP) and
// starts the disk's removable-media boot file (\EFI\BOOT\BOOTX64.EFI).
// initrd= on the command line lets an EFI-stub kernel find the archive iPXE
// registered under that name.
const IPXETemplate = `#!ipxe
echo nbh: iPXE script for ${net0/mac} at ${net0/ip}
{{if .SAN -}}
set initiator-iqn {{.SAN.Initiator}}
{{if .SAN.User -}}
set username {{.SAN.User}}
set password {{.SAN.Password}}
{{end -}}
echo nbh: SAN boot from {{.SAN.URI}}
sanboot {{if .SAN.NoDescribe}}--no-describe {{end}}{{.SAN.URI}} || goto failed
{{else -}}
kernel {{.KernelURL}} initrd=initrd.img {{.Cmdline}} || goto failed
initrd --name initrd.img {{.InitrdURL}} || goto failed
echo nbh: booting kernel
boot || goto failed
{{end -}}
:failed
echo nbh: iPXE boot failed
exit 1
`

// PXELinuxTemplate is the default pxelinux-style config, as U-Boot's "pxe"
// command reads it.
const PXELinuxTemplate = `# nbh: pxelinux config
default nbh
prompt 0
timeout 1
label nbh
	kernel {{.Kernel}}
	initrd {{.Initrd}}
	append {{.Cmdline}}
`

// GRUBTemplate is the default grub.cfg: kernel and archive over HTTP from
// the boot server.
const GRUBTemplate = `set timeout=0
echo "nbh: grub.cfg"
echo "nbh: loading kernel"
linux ({{if .TFTP}}tftp{{else}}http{{end}},{{.Server}})/{{.Kernel}} {{.Cmdline}}
echo "nbh: loading archive"
initrd ({{if .TFTP}}tftp{{else}}http{{end}},{{.Server}})/{{.Initrd}}
echo "nbh: booting kernel"
boot
echo "nbh: GRUB boot failed"
`

// Template is a loader configuration as a Go text/template over Boot:
// nbh's defaults (IPXETemplate, PXELinuxTemplate, GRUBTemplate) and a
// user's own file alike.
type Template struct {
	Name string // the file it came from, or the default's name
	t    *template.Template
}

// Limits on a user's template: its size, and what it may write (a loader
// config is a page of text; {{range}} has nothing to iterate in Boot, and
// over a number it could loop for as long as it likes).
const (
	MaxTemplate = 256 << 10
	MaxConfig   = 1 << 20
)

// ParseTemplate parses a loader configuration template; name is the file
// it came from, and errors name it with the line (file:LINE: ...).
func ParseTemplate(name, text string) (*Template, error) {
	if len(text) > MaxTemplate {
		return nil, fmt.Errorf("loader config %s: %d bytes, more than %d", name, len(text), MaxTemplate)
	}
	t, err := template.New(name).Option("missingkey=error").Parse(text)
	if err != nil {
		return nil, fmt.Errorf("loader config %w", err)
	}
	for _, tt := range t.Templates() {
		if tt.Tree == nil {
			continue
		}
		if r := findRange(tt.Tree.Root); r != nil {
			line, _ := tt.ErrorContext(r)
			return nil, fmt.Errorf("loader config %s: {{range}} is not supported: a loader config has nothing to iterate over", line)
		}
	}
	return &Template{Name: name, t: t}, nil
}

// findRange returns the first {{range}} under n.
func findRange(n parse.Node) parse.Node {
	switch n := n.(type) {
	case *parse.RangeNode:
		return n
	case *parse.ListNode:
		if n == nil {
			return nil
		}
		for _, c := range n.Nodes {
			if r := findRange(c); r != nil {
				return r
			}
		}
	case *parse.IfNode:
		if r := findRange(n.List); r != nil {
			return r
		}
		if n.ElseList != nil {
			return findRange(n.ElseList)
		}
	case *parse.WithNode:
		if r := findRange(n.List); r != nil {
			return r
		}
		if n.ElseList != nil {
			return findRange(n.ElseList)
		}
	}
	return nil
}

// capped is a buffer that refuses to grow past MaxConfig.
type capped struct{ strings.Builder }

func (c *capped) Write(p []byte) (int, error) {
	if c.Len()+len(p) > MaxConfig {
		return 0, fmt.Errorf("output of more than %d bytes", MaxConfig)
	}
	return c.Builder.Write(p)
}

// ReadTemplate parses the template in file, and executes it once against
// Example so that a field it does not know fails here, before any boot.
func ReadTemplate(file string) (*Template, error) {
	if fi, err := os.Stat(file); err == nil && fi.Size() > MaxTemplate {
		return nil, fmt.Errorf("loader config %s: %d bytes, more than %d", file, fi.Size(), MaxTemplate)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("loader config: %w", err)
	}
	t, err := ParseTemplate(file, string(b))
	if err != nil {
		return nil, err
	}
	if _, err := t.Execute(Example()); err != nil {
		return nil, err
	}
	return t, nil
}

// Example is a Boot with every field set, for checking templates.
func Example() Boot {
	return Boot{
		Server: "10.0.2.2", Kernel: "g1/vmlinuz", Initrd: "g1/initrd.img", Cmdline: "console=ttyS0",
		Guest: "g1", MAC: "52:54:00:4e:42:01", IP: "10.0.2.15", Arch: "amd64", Firmware: "seabios-ipxe",
		Root: "nfs", RootPath: "10.0.2.2:/nbh/root",
		SAN: &SANBoot{URI: "iscsi:10.0.2.2::3260:0:iqn.2026-11.dev.nbh:root", Initiator: "iqn.2026-11.dev.nbh:g1"},
	}
}

// Execute renders the template for b; errors name the file and line.
func (t *Template) Execute(b Boot) (string, error) {
	var out capped
	if err := t.t.Execute(&out, b); err != nil {
		return "", fmt.Errorf("loader config %w", err)
	}
	return out.String(), nil
}

// mustParse parses one of nbh's own templates.
func mustParse(name, text string) *Template {
	t, err := ParseTemplate(name, text)
	if err != nil {
		panic(err)
	}
	return t
}

// IPXEDefault, PXELinuxDefault and GRUBDefault are nbh's own loader
// configurations, parsed.
func IPXEDefault() *Template     { return ipxeDefault }
func PXELinuxDefault() *Template { return pxelinuxDefault }
func GRUBDefault() *Template     { return grubDefault }

var (
	ipxeDefault     = mustParse("nbh:boot.ipxe", IPXETemplate)
	pxelinuxDefault = mustParse("nbh:pxelinux.cfg", PXELinuxTemplate)
	grubDefault     = mustParse("nbh:grub.cfg", GRUBTemplate)
)

// IPXEScript is the default iPXE script for b.
func IPXEScript(b Boot) string { return mustExecute(ipxeDefault, b) }

// PXELinux is the default pxelinux config for b.
func PXELinux(b Boot) string { return mustExecute(pxelinuxDefault, b) }

// GRUBConfig is the default grub.cfg for b.
func GRUBConfig(b Boot) string { return mustExecute(grubDefault, b) }

func mustExecute(t *Template, b Boot) string {
	s, err := t.Execute(b)
	if err != nil {
		panic(err) // nbh's own templates use only Boot's fields
	}
	return s
}

// UBootScript widens TFTP blocks and windows (one block per round trip
// would make a 33 MB kernel take tens of seconds) and then boots the
// pxelinux config for this NIC. The window stays at 8: with 32, U-Boot
// 2023.01's virtio-net (32 receive buffers) stopped receiving mid-transfer;
// its e1000 driver loses blocks of any window and gets 1 (3.7 MB/s).
//
// nfs lists the machines (by MAC address) whose boot files come from an
// NFS export instead (Boot.NFS): the script is the same file for every
// U-Boot guest of a lab, so each of those gets a branch of its own.
func UBootScript(nfs map[string]Boot) string {
	var b strings.Builder
	b.WriteString(`echo nbh: U-Boot script
setenv tftpblocksize 1468
setenv tftpwindowsize 8
if test "${ethact}" = "e1000#0"; then
	setenv tftpwindowsize 1
fi
`)
	macs := make([]string, 0, len(nfs))
	for mac := range nfs {
		macs = append(macs, mac)
	}
	sort.Strings(macs)
	for _, mac := range macs {
		n := nfs[mac]
		fmt.Fprintf(&b, `if test "${ethaddr}" = "%[1]s"; then
	echo nbh: reading the boot files over NFS from %[2]s:%[3]s
	if nfs ${kernel_addr_r} %[2]s:%[3]s/%[4]s && nfs ${ramdisk_addr_r} %[2]s:%[3]s/%[5]s; then
		setenv bootargs "%[6]s"
		booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}
	fi
	echo nbh: U-Boot boot failed
	exit
fi
`, mac, n.Server, n.NFS, n.Kernel, n.Initrd, n.Cmdline)
	}
	b.WriteString(`if pxe get; then
	echo nbh: booting the pxelinux config
	pxe boot
fi
echo nbh: U-Boot boot failed
`)
	return b.String()
}

// UBootImage wraps a script in a legacy U-Boot image header (type script,
// uncompressed), like "mkimage -T script" does.
func UBootImage(name, script string) []byte {
	// Script images are multi-file images: a zero-terminated list of
	// lengths, then the data.
	var data bytes.Buffer
	binary.Write(&data, binary.BigEndian, uint32(len(script)))
	binary.Write(&data, binary.BigEndian, uint32(0))
	data.WriteString(script)
	d := data.Bytes()

	h := make([]byte, 64)
	be := binary.BigEndian
	be.PutUint32(h[0:], 0x27051956) // magic
	be.PutUint32(h[8:], 0)          // time: 0, reproducible
	be.PutUint32(h[12:], uint32(len(d)))
	be.PutUint32(h[24:], crc32.ChecksumIEEE(d))
	h[28] = 5  // OS: Linux
	h[29] = 22 // arch: arm64
	h[30] = 6  // type: script
	h[31] = 0  // no compression
	copy(h[32:], name)
	be.PutUint32(h[4:], crc32.ChecksumIEEE(h))
	return append(h, d...)
}

// GRUBModules are built into the netboot image.
func GRUBModules() []string { return slices.Clone(grubModules) }

var grubModules = []string{"tftp", "http", "net", "efinet", "linux", "normal", "configfile", "echo", "gzio", "test", "boot", "halt", "reboot"}

// GRUBVerifyModules are added to a netboot image that verifies signatures:
// OpenPGP, RSA and SHA-256.
func GRUBVerifyModules() []string { return slices.Clone(grubVerifyModules) }

var grubVerifyModules = []string{"pgp", "gcry_rsa", "gcry_sha256"}

// GRUBImage runs grub-mkimage to build an arm64-efi netboot image whose
// prefix is prefix (e.g. "(tftp)/g1/grub"): GRUB then reads grub.cfg from
// there, from the server the firmware's DHCP named. With pubkey (a binary
// OpenPGP public key), the key is built in and an embedded early config sets
// check_signatures=enforce: GRUB then loads no file — grub.cfg, kernel,
// archive — without a valid FILE.sig by that key.
func GRUBImage(ctx context.Context, moduleDir, prefix, out, pubkey string) error {
	tool, err := exec.LookPath("grub-mkimage")
	if err != nil {
		return fmt.Errorf("bootcfg: grub-mkimage is not installed (Debian package grub-common): %w", err)
	}
	args := []string{"-O", "arm64-efi", "-d", moduleDir, "-p", prefix, "-o", out}
	mods := GRUBModules()
	if pubkey != "" {
		early := out + ".early.cfg"
		if err := os.WriteFile(early, []byte("set check_signatures=enforce\nexport check_signatures\n"), 0o644); err != nil {
			return fmt.Errorf("bootcfg: %w", err)
		}
		defer os.Remove(early)
		args = append(args, "--pubkey", pubkey, "-c", early)
		mods = append(mods, grubVerifyModules...)
	}
	args = append(args, mods...)
	if b, err := exec.CommandContext(ctx, tool, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("bootcfg: grub-mkimage: %v: %s", err, strings.TrimSpace(string(b)))
	}
	return nil
}

// UBootEnvSize is the environment size of U-Boot's qemu_arm64 build
// (CONFIG_ENV_SIZE), stored at the start of the second flash bank.
const UBootEnvSize = 0x40000

// UBootFlashSize is the size of a QEMU virt flash bank.
const UBootFlashSize = 64 << 20

// UBootEnv builds a flash environment for U-Boot: the binary's own default
// environment with set applied on top (an environment in flash replaces the
// defaults whole, so they are carried over). It returns the environment
// block: a CRC-32 followed by NUL-separated name=value pairs.
func UBootEnv(ubootBin []byte, set map[string]string) ([]byte, error) {
	start := bytes.Index(ubootBin, []byte("bootcmd=run distro_bootcmd\x00"))
	if start < 0 {
		return nil, fmt.Errorf("bootcfg: no default environment found in the U-Boot binary")
	}
	end := bytes.Index(ubootBin[start:], []byte{0, 0})
	if end < 0 {
		return nil, fmt.Errorf("bootcfg: unterminated default environment in the U-Boot binary")
	}
	var names []string
	vals := map[string]string{}
	for _, kv := range strings.Split(string(ubootBin[start:start+end]), "\x00") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			continue
		}
		if _, dup := vals[k]; !dup {
			names = append(names, k)
		}
		vals[k] = v
	}
	for _, k := range sortedKeys(set) {
		if _, ok := vals[k]; !ok {
			names = append(names, k)
		}
		vals[k] = set[k]
	}
	data := make([]byte, UBootEnvSize-4)
	off := 0
	for _, k := range names {
		kv := k + "=" + vals[k]
		if off+len(kv)+2 > len(data) {
			return nil, fmt.Errorf("bootcfg: U-Boot environment exceeds %d bytes", UBootEnvSize)
		}
		off += copy(data[off:], kv) + 1
	}
	env := make([]byte, 4, UBootEnvSize)
	binary.LittleEndian.PutUint32(env, crc32.ChecksumIEEE(data))
	return append(env, data...), nil
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
