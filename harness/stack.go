package harness

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"

	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/images"
)

// Stack is a user's own boot stack for one architecture: the slots of a
// Spec (and the lab's Serve) that are theirs, for every chain of the arch.
// A matrix runs it (nbh matrix --stack FILE) across every chain, root and
// fault that applies: Apply puts into a row's spec what the row's chain can
// use. Maps are keyed by what the slot depends on: LoaderConfig by the
// loader's kind ("ipxe", "pxelinux", "grub"), Loader, FirmwareCode,
// FirmwareVars and BIOS by the chain's firmware name, "*" for every chain
// that takes one.
type Stack struct {
	Kernel    string `json:"kernel,omitempty"`
	Initrd    string `json:"initrd,omitempty"`
	Append    string `json:"append,omitempty"`
	RootDir   string `json:"root_dir,omitempty"`
	RootImage string `json:"root_image,omitempty"`
	// ArchiveFiles is Spec.ArchiveFromRoot: lines of a file list.
	ArchiveFiles []string          `json:"archive_files,omitempty"`
	NIC          string            `json:"nic,omitempty"`
	NICROM       string            `json:"nic_rom,omitempty"`
	LoaderConfig map[string]string `json:"loader_config,omitempty"`
	Loader       map[string]string `json:"loader,omitempty"`
	FirmwareCode map[string]string `json:"firmware_code,omitempty"`
	FirmwareVars map[string]string `json:"firmware_vars,omitempty"`
	BIOS         map[string]string `json:"bios,omitempty"`
	Serve        string            `json:"serve,omitempty"`
	// Expect is the ordered console patterns, the last one success
	// (Spec.Steps and Expect); FailOn the user's failure signatures,
	// REGEXP=REASON.
	Expect []string `json:"expect,omitempty"`
	FailOn []string `json:"fail_on,omitempty"`
}

// loaderKinds are LoaderConfig's keys.
var loaderKinds = map[string]string{"ipxe": ConfigIPXE, "pxelinux": ConfigPXELinux, "grub": ConfigGRUB}

// ReadStacks reads a stack file: a JSON object of Stacks by architecture
// ({"amd64": {...}, "arm64": {...}}). Relative paths in it are from the
// file's folder.
func ReadStacks(file string) (map[string]Stack, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("stack: %w", err)
	}
	var stacks map[string]Stack
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&stacks); err != nil {
		return nil, fmt.Errorf("stack %s: %w", file, err)
	}
	dir := filepath.Dir(file)
	abs := func(p *string) {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	for arch, s := range stacks {
		if !slices.Contains(images.Arches(), arch) {
			return nil, fmt.Errorf("stack %s: architecture %q: want one of %s", file, arch, strings.Join(images.Arches(), ", "))
		}
		for k := range s.LoaderConfig {
			if loaderKinds[k] == "" {
				return nil, fmt.Errorf("stack %s: %s: loader_config %q: want ipxe, pxelinux or grub", file, arch, k)
			}
		}
		for _, p := range []*string{&s.Kernel, &s.Initrd, &s.RootDir, &s.RootImage, &s.NICROM, &s.Serve} {
			abs(p)
		}
		for _, m := range []map[string]string{s.LoaderConfig, s.Loader, s.FirmwareCode, s.FirmwareVars, s.BIOS} {
			for k, v := range m {
				abs(&v)
				m[k] = v
			}
		}
		for _, f := range s.FailOn {
			if _, err := ParseFailOn(f); err != nil {
				return nil, fmt.Errorf("stack %s: %s: %w", file, arch, err)
			}
		}
		for _, e := range s.Expect {
			if _, err := regexp.Compile(e); err != nil {
				return nil, fmt.Errorf("stack %s: %s: expect %q: %w", file, arch, e, err)
			}
		}
		if _, err := qemu.LookupNIC(s.NIC); err != nil {
			return nil, fmt.Errorf("stack %s: %s: %w", file, arch, err)
		}
		// A misspelt chain would silently boot nbh's own file instead.
		for slot, m := range map[string]map[string]string{"loader": s.Loader, "firmware_code": s.FirmwareCode, "firmware_vars": s.FirmwareVars, "bios": s.BIOS} {
			for fw := range m {
				if _, err := LookupChain(arch, fw); fw != "*" && err != nil {
					return nil, fmt.Errorf("stack %s: %s: %s %q: %w", file, arch, slot, fw, err)
				}
			}
		}
		stacks[arch] = s
	}
	return stacks, nil
}

// Arches are the stack file's architectures, sorted.
func Arches(stacks map[string]Stack) []string {
	var out []string
	for a := range stacks {
		out = append(out, a)
	}
	sort.Strings(out)
	return out
}

// pick is m's entry for the chain's firmware, else its "*".
func pick(m map[string]string, firmware string) string {
	if v, ok := m[firmware]; ok {
		return v
	}
	return m["*"]
}

// Apply fills the spec's slots that the stack has and the chain and root
// can use, and reports whether the row is one this stack can run: a fault
// that changes the reference archive has no place with an archive of the
// user's, nor one that changes the reference root's configuration with a
// root of theirs, and an image is no NFS root.
func (st Stack) Apply(c Chain, s *Spec, serve *string) bool {
	for _, given := range s.Faults {
		f, err := LookupFault(given.Name)
		if err != nil {
			return true // Boot says what is wrong with it
		}
		if st.Initrd != "" && f.Where == "archive" {
			return false
		}
		if st.RootDir != "" || st.RootImage != "" {
			var p plan
			f.apply(&p)
			if p.loaderNFS || (p.editConfig || p.swap) && (len(st.ArchiveFiles) == 0 || s.Root != RootNFS) {
				return false
			}
		}
	}
	if s.Root == RootNFS && st.RootImage != "" && st.RootDir == "" {
		return false
	}
	if s.Root == RootSANBoot && (st.RootDir != "" || st.RootImage != "") {
		return false
	}
	s.Kernel, s.Initrd, s.Append, s.NIC, s.NICROM = st.Kernel, st.Initrd, st.Append, st.NIC, st.NICROM
	if s.Root == RootNFS && st.Initrd == "" && st.RootDir != "" {
		s.ArchiveFromRoot = st.ArchiveFiles
	}
	if s.Root == RootNFS || s.Root == RootISCSI {
		s.RootDir = st.RootDir
		if s.Root == RootISCSI && st.RootImage != "" {
			s.RootDir, s.RootImage = "", st.RootImage
		}
	}
	for k, v := range st.LoaderConfig {
		if loaderKinds[k] == c.LoaderConfig {
			s.LoaderConfig = v
		}
	}
	if c.takesLoader() {
		s.Loader = pick(st.Loader, c.Firmware)
	}
	if c.UEFI {
		s.FirmwareCode = pick(st.FirmwareCode, c.Firmware)
	}
	if c.Load == qemu.LoadPflash {
		s.FirmwareVars = pick(st.FirmwareVars, c.Firmware)
	}
	if !c.UEFI && c.Load != qemu.LoadKernel {
		s.BIOS = pick(st.BIOS, c.Firmware)
	}
	if n := len(st.Expect); n > 0 {
		s.Steps, s.Expect = st.Expect[:n-1], st.Expect[n-1]
	}
	for _, f := range st.FailOn {
		fo, _ := ParseFailOn(f)
		s.FailOn = append(s.FailOn, fo)
	}
	if c.Drives(s.NIC, s.BringsNICDriver()) != nil {
		return false
	}
	*serve = st.Serve
	return true
}
