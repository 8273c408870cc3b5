// Package bundle is the on-disk form of a repro bundle: one boot, kept so
// that it can be replayed anywhere. A bundle is a folder (or that folder as a
// .tar.zst) holding
//
//	spec.json          the boot and its lab (Spec, Lab), the seed of every
//	                   random choice, what recorded it (nbh, QEMU, host),
//	                   QEMU's command line, and which files hold secrets
//	verdict.json       how the boot ended, with the time per stage
//	pins-ARCH.json     the Debian packages the guest booted (images.PinSet)
//	files/             the caller's own kernel, archive and added files
//	console.log, timeline.jsonl, network.pcapng   the artifacts
//
// Every path inside is relative to the folder, so a bundle made on one
// machine replays on another. This package reads and writes the format; the
// harness turns it into a lab and a spec (harness.FromBundle).
package bundle

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"
)

// Format is the bundle format version; readers refuse others.
const Format = 1

// File names inside a bundle.
const (
	SpecFile    = "spec.json"
	VerdictFile = "verdict.json"
	FilesDir    = "files"
)

// PinsFile is the name of arch's pins inside a bundle.
func PinsFile(arch string) string { return "pins-" + arch + ".json" }

// ErrBad marks a bundle that cannot be read or replayed as it is (nbh repro
// exits 2 for it).
var ErrBad = errors.New("bad bundle")

// Bundle is spec.json.
type Bundle struct {
	Format   int       `json:"format"`
	Recorded Recorded  `json:"recorded"`
	Lab      Lab       `json:"lab"`
	Spec     Spec      `json:"spec"`
	Secrets  []Secret  `json:"secrets"`
	Created  time.Time `json:"created"`

	// Dir is the folder the bundle was read from (not stored).
	Dir string `json:"-"`
}

// Recorded is what made the boot: versions, host and QEMU's command line.
// A replay reports them next to its own; they do not decide it.
type Recorded struct {
	NBH   string `json:"nbh"`
	QEMU  string `json:"qemu"`
	Host  string `json:"host"`  // GOOS/GOARCH and the kernel release
	Accel string `json:"accel"` // kvm or tcg, and why
	// Argv is QEMU's command line as it ran; its paths are the recording
	// lab's private files, not the bundle's.
	Argv []string `json:"qemu_argv"`
}

// Lab is the boot network the guest booted on.
type Lab struct {
	// IPsec is the security policy of an IPsec-required network; nil: clear.
	IPsec      *Policy `json:"ipsec,omitempty"`
	ESPKeyBits int     `json:"esp_key_bits,omitempty"`
	MTU        int     `json:"mtu,omitempty"`
	// Serve is the user's tree merged into the boot server (a host path,
	// referenced, not copied: it can be a whole installer tree).
	Serve string `json:"serve,omitempty"`
	// Seed decides the lab's random choices for the guest (ESP SPIs and
	// keys, CHAP secret). Secret: it derives keys.
	Seed string `json:"seed"`
}

// Policy is an ipsec.Policy in words.
type Policy struct {
	Rules   []Rule `json:"rules"`
	Default string `json:"default"` // bypass, protect or discard
}

// Rule is an ipsec.Rule in words.
type Rule struct {
	Proto  uint8  `json:"proto"` // 0: any
	Port   uint16 `json:"port"`  // 0: any
	Action string `json:"action"`
}

// FailOn is a failure signature of the user's (harness.FailOn).
type FailOn struct {
	Pattern string `json:"pattern"`
	Reason  string `json:"reason"`
}

// Spec is a harness.Spec without its callbacks, with host paths turned into
// paths inside the bundle ("" where the guest booted the pinned kernel or the
// reference archive).
type Spec struct {
	Arch     string `json:"arch"`
	Firmware string `json:"firmware"`
	Name     string `json:"name"`
	MAC      string `json:"mac"`
	IP       string `json:"ip"`
	Family   string `json:"family,omitempty"`
	NIC      string `json:"nic,omitempty"`
	Root     string `json:"root,omitempty"`
	// RootDir and RootImage are the user's root (host paths: referenced,
	// not copied, for their size).
	RootDir      string `json:"root_dir,omitempty"`
	RootImage    string `json:"root_image,omitempty"`
	RootWritable bool   `json:"root_writable,omitempty"`
	// ArchiveFromRoot is the file list of the root's files the reference
	// archive carries.
	ArchiveFromRoot  []string           `json:"archive_from_root,omitempty"`
	CHAP             bool               `json:"chap,omitempty"`
	Kernel           string             `json:"kernel,omitempty"`
	LoaderConfig     string             `json:"loader_config,omitempty"`
	Loader           string             `json:"loader,omitempty"`
	FirmwareCode     string             `json:"firmware_code,omitempty"`
	FirmwareVars     string             `json:"firmware_vars,omitempty"`
	BIOS             string             `json:"bios,omitempty"`
	NICROM           string             `json:"nic_rom,omitempty"`
	Initrd           string             `json:"initrd,omitempty"`
	Append           string             `json:"append,omitempty"`
	ArchiveFiles     map[string]string  `json:"archive_files,omitempty"`
	RootFiles        map[string]string  `json:"root_files,omitempty"`
	NoArchiveRefresh bool               `json:"no_archive_refresh,omitempty"`
	OnStale          string             `json:"on_stale,omitempty"`
	Compression      string             `json:"compression,omitempty"`
	Signed           bool               `json:"signed,omitempty"`
	SecureBoot       string             `json:"secure_boot,omitempty"`
	SecureBootCerts  []string           `json:"secure_boot_certs,omitempty"` // bundle-relative
	Faults           []string           `json:"faults,omitempty"`
	KeepPrompts      bool               `json:"keep_prompts,omitempty"`
	Steps            []string           `json:"expect_steps,omitempty"`
	Expect           string             `json:"expect"`
	FailOn           []FailOn           `json:"fail_on,omitempty"`
	Memory           int                `json:"memory,omitempty"`
	Timeout          float64            `json:"timeout_seconds"`
	StageTimeouts    map[string]float64 `json:"stage_timeouts_seconds,omitempty"`
}

// Secret names a file of the bundle that holds a secret, and which.
type Secret struct {
	File string `json:"file"`
	What string `json:"what"`
}

// Verdict is verdict.json: how the boot ended.
type Verdict struct {
	OK     bool   `json:"ok"`
	Reason string `json:"reason,omitempty"`
	Stage  string `json:"stage"`
	Line   string `json:"line,omitempty"`
	Detail string `json:"detail,omitempty"`
	// Warnings are what went wrong without failing the boot.
	Warnings []string `json:"warnings,omitempty"`
	Elapsed  float64  `json:"elapsed_seconds"`
	Spans    []Span   `json:"spans"`
}

// Span is the time one stage took.
type Span struct {
	Stage   string  `json:"stage"`
	Start   float64 `json:"start_seconds"` // since QEMU started
	Seconds float64 `json:"seconds"`
}

// Outcome is "marker" or "REASON at STAGE": what a replay must match.
func (v Verdict) Outcome() string {
	if v.OK {
		return "marker"
	}
	return v.Reason + " at " + v.Stage
}

// Write writes spec.json and verdict.json into dir.
func Write(dir string, b *Bundle, v Verdict) error {
	b.Format = Format
	if err := writeJSON(filepath.Join(dir, SpecFile), b); err != nil {
		return err
	}
	return writeJSON(filepath.Join(dir, VerdictFile), v)
}

func writeJSON(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

// Read reads the bundle in folder dir: its spec and its recorded verdict.
// Errors wrap ErrBad.
func Read(dir string) (*Bundle, Verdict, error) {
	var b Bundle
	var v Verdict
	if err := readJSON(filepath.Join(dir, SpecFile), &b); err != nil {
		return nil, v, err
	}
	if b.Format != Format {
		return nil, v, fmt.Errorf("%w: %s: format %d, this nbh reads format %d", ErrBad, filepath.Join(dir, SpecFile), b.Format, Format)
	}
	if err := readJSON(filepath.Join(dir, VerdictFile), &v); err != nil {
		return nil, v, err
	}
	if b.Spec.Arch == "" || b.Spec.Firmware == "" {
		return nil, v, fmt.Errorf("%w: %s: no arch or firmware", ErrBad, filepath.Join(dir, SpecFile))
	}
	b.Dir = dir
	return &b, v, nil
}

// maxJSON bounds a bundle's JSON files.
const maxJSON = 16 << 20

func readJSON(path string, v any) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrBad, err)
	}
	defer f.Close()
	// A spec or verdict is a few KiB; a bundle's is not trusted to be.
	data, err := io.ReadAll(io.LimitReader(f, maxJSON+1))
	if err != nil {
		return fmt.Errorf("%w: %v", ErrBad, err)
	}
	if len(data) > maxJSON {
		return fmt.Errorf("%w: %s: %w: more than %d MiB", ErrBad, path, ErrTooLarge, maxJSON>>20)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%w: %s: %v", ErrBad, path, err)
	}
	return nil
}

// Path is a path inside the bundle as a host path; it refuses paths that
// leave the bundle (a bundle from a bug report is untrusted).
func (b *Bundle) Path(rel string) (string, error) {
	if rel == "" {
		return "", nil
	}
	if !filepath.IsLocal(rel) {
		return "", fmt.Errorf("%w: path %q leaves the bundle", ErrBad, rel)
	}
	p := filepath.Join(b.Dir, rel)
	if fi, err := os.Lstat(p); err != nil {
		return "", fmt.Errorf("%w: %v", ErrBad, err)
	} else if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("%w: %s is not a regular file", ErrBad, rel)
	}
	return p, nil
}
