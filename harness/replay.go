package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	"nbh.dev/nbh/harness/bundle"
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/images"
	"nbh.dev/nbh/internal/fsutil"
	"nbh.dev/nbh/internal/version"
)

// artifactFiles are what a guest leaves in its artifacts folder.
var artifactFiles = []string{"console.log", "timeline.jsonl", "network.pcapng"}

// WriteBundle writes a repro bundle of the guest's boot into dir (made if
// missing): the spec and lab that decided it, with the lab's seed, the pins,
// the versions, QEMU's command line, the verdict v, the caller's own files
// (kernel, archive, added files) and the artifacts. Call it after Close, so
// the artifacts are complete. See package bundle for the layout.
func (g *Guest) WriteBundle(dir string, v Verdict) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("bundle: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("bundle: %w", err)
	}
	s := g.Spec()
	opts := g.lab.Options()
	b := &bundle.Bundle{
		Created: time.Now().UTC(),
		Recorded: bundle.Recorded{
			NBH: version.String(), QEMU: qemu.Version(s.Arch), Host: hostName(),
			Accel: strings.TrimSpace(g.Accel.Name + " (" + g.Accel.Why + ")"), Argv: g.Argv(),
		},
		Lab: bundle.Lab{ESPKeyBits: opts.ESPKeyBits, MTU: opts.MTU, Seed: opts.Seed, Serve: opts.Serve},
		Spec: bundle.Spec{
			Arch: s.Arch, Firmware: s.Firmware, Name: s.Name, MAC: s.MAC, IP: s.IP, Family: s.Family, NIC: s.NIC, Root: s.Root, CHAP: s.CHAP,
			RootDir: s.RootDir, RootImage: s.RootImage, RootWritable: s.RootWritable, ArchiveFromRoot: s.ArchiveFromRoot,
			Append: s.Append, NoArchiveRefresh: s.NoArchiveRefresh, OnStale: s.OnStale, Compression: s.Compression,
			Signed: s.Signed, SecureBoot: s.SecureBoot, KeepPrompts: s.KeepPrompts, Expect: s.Expect, Memory: s.Memory,
			Timeout: s.Timeout.Seconds(),
		},
	}
	if opts.IPsec != nil {
		p := &bundle.Policy{Default: opts.IPsec.Default.String()}
		for _, r := range opts.IPsec.Rules {
			p.Rules = append(p.Rules, bundle.Rule{Proto: r.Proto, Port: r.Port, Action: r.Action.String()})
		}
		b.Lab.IPsec = p
	}
	for _, f := range s.Faults {
		b.Spec.Faults = append(b.Spec.Faults, f.Name)
	}
	b.Spec.Steps = s.Steps
	for _, f := range s.FailOn {
		b.Spec.FailOn = append(b.Spec.FailOn, bundle.FailOn(f))
	}
	if len(s.StageTimeouts) > 0 {
		b.Spec.StageTimeouts = map[string]float64{}
		for st, d := range s.StageTimeouts {
			b.Spec.StageTimeouts[st.String()] = d.Seconds()
		}
	}
	// The caller's own files travel with the bundle.
	keep := func(src, name string) string {
		if src == "" || err != nil {
			return ""
		}
		rel := filepath.Join(bundle.FilesDir, name)
		if err = copyInto(src, filepath.Join(dir, rel)); err != nil {
			err = fmt.Errorf("bundle: %w", err)
		}
		return filepath.ToSlash(rel)
	}
	b.Spec.Kernel = keep(s.Kernel, "kernel")
	b.Spec.Initrd = keep(s.Initrd, "initrd")
	for _, f := range []struct {
		src  string
		dst  *string
		name string
	}{
		{s.LoaderConfig, &b.Spec.LoaderConfig, "loader-config"}, {s.Loader, &b.Spec.Loader, "loader/" + filepath.Base(s.Loader)},
		{s.FirmwareCode, &b.Spec.FirmwareCode, "firmware-code"}, {s.FirmwareVars, &b.Spec.FirmwareVars, "firmware-vars"},
		{s.BIOS, &b.Spec.BIOS, "bios"}, {s.NICROM, &b.Spec.NICROM, "nic-rom"},
	} {
		*f.dst = keep(f.src, f.name)
	}
	for i, c := range s.SecureBootCerts {
		b.Spec.SecureBootCerts = append(b.Spec.SecureBootCerts, keep(c, fmt.Sprintf("db-cert-%d", i+1)))
	}
	keepAll := func(m map[string]string, folder string) map[string]string {
		if len(m) == 0 {
			return nil
		}
		out := map[string]string{}
		guestPaths := make([]string, 0, len(m))
		for p := range m {
			guestPaths = append(guestPaths, p)
		}
		sort.Strings(guestPaths)
		for i, p := range guestPaths {
			out[p] = keep(m[p], filepath.Join(folder, fmt.Sprintf("%d-%s", i, filepath.Base(m[p]))))
		}
		return out
	}
	b.Spec.ArchiveFiles = keepAll(s.ArchiveFiles, "archive")
	b.Spec.RootFiles = keepAll(s.RootFiles, "root")
	if err != nil {
		return err
	}
	if filepath.Clean(dir) != filepath.Clean(g.Dir) {
		for _, f := range artifactFiles {
			if _, serr := os.Stat(filepath.Join(g.Dir, f)); serr == nil {
				if err := copyInto(filepath.Join(g.Dir, f), filepath.Join(dir, f)); err != nil {
					return fmt.Errorf("bundle: %w", err)
				}
			}
		}
	}
	b.Secrets = g.secrets()
	pins, err := g.lab.cache.PinSet(s.Arch)
	if err != nil {
		return err
	}
	if err := images.WritePins(dir, pins); err != nil {
		return err
	}
	return bundle.Write(dir, b, bundleVerdict(v, g.Spans(), g.Start))
}

// secrets says which of the bundle's files hold what secret.
func (g *Guest) secrets() []bundle.Secret {
	out := []bundle.Secret{{File: bundle.SpecFile, What: "lab.seed: derives the guest's ESP keys and CHAP secret"}}
	if g.chap != nil {
		what := "the guest's CHAP secret, on the kernel command line"
		out = append(out,
			bundle.Secret{File: bundle.SpecFile, What: "qemu_argv: " + what + " (direct boots)"},
			bundle.Secret{File: "console.log", What: what},
			bundle.Secret{File: "network.pcapng", What: what + " (loader script) and the CHAP exchange"})
	}
	if g.espConf != nil {
		out = append(out, bundle.Secret{File: "network.pcapng", What: "the boot archive with the guest's ESP keys (" + ESPConfPath + "), fetched in clear"})
	}
	return out
}

func bundleVerdict(v Verdict, spans []timeline.Span, start time.Time) bundle.Verdict {
	bv := bundle.Verdict{OK: v.OK, Reason: string(v.Reason), Stage: v.Stage.String(), Line: v.Line, Detail: v.Detail, Warnings: v.Warnings,
		Elapsed: v.Elapsed.Seconds()}
	for _, s := range spans {
		bv.Spans = append(bv.Spans, bundle.Span{Stage: s.Stage.String(), Start: s.Start.Sub(start).Seconds(), Seconds: s.Duration.Seconds()})
	}
	return bv
}

// copyInto copies src to dst, making dst's folder: a hard link where it can
// (a kernel is tens of megabytes), else a copy.
func copyInto(src, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	si, err := os.Stat(src)
	if err != nil {
		return err
	}
	if di, err := os.Stat(dst); err == nil && os.SameFile(si, di) {
		return nil // already in the bundle (an artifacts folder made into one)
	}
	os.Remove(dst)
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	return fsutil.CopyFile(src, dst)
}

func hostName() string {
	rel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return fmt.Sprintf("%s/%s %s", runtime.GOOS, runtime.GOARCH, strings.TrimSpace(string(rel)))
}

// HostPaths are the host folders and files outside the bundle a replay of
// it would serve to its guest (a root tree or image, a served tree): a
// bundle is untrusted, so the caller shows them and asks before replaying.
func HostPaths(b *bundle.Bundle) []string {
	var out []string
	for _, p := range []string{b.Spec.RootDir, b.Spec.RootImage, b.Lab.Serve} {
		if p != "" {
			out = append(out, p)
		}
	}
	return out
}

// FromBundle returns the lab options and the spec that replay a bundle:
// the same chain, root, network, faults, MAC, address and seed, with the
// bundle's own files. The caller adds Cache (with the bundle's pins, see
// BundlePins), Log, Artifacts and OnStage. Errors wrap bundle.ErrBad.
func FromBundle(b *bundle.Bundle) (Options, Spec, error) {
	bad := func(format string, a ...any) (Options, Spec, error) {
		return Options{}, Spec{}, fmt.Errorf("%w: %s", bundle.ErrBad, fmt.Sprintf(format, a...))
	}
	opts := Options{Seed: b.Lab.Seed, MTU: b.Lab.MTU, ESPKeyBits: b.Lab.ESPKeyBits}
	if p := b.Lab.IPsec; p != nil {
		def, ok := actions[p.Default]
		if !ok {
			return bad("ipsec default %q", p.Default)
		}
		opts.IPsec = &ipsec.Policy{Default: def}
		for _, r := range p.Rules {
			a, ok := actions[r.Action]
			if !ok {
				return bad("ipsec rule action %q", r.Action)
			}
			opts.IPsec.Rules = append(opts.IPsec.Rules, ipsec.Rule{Proto: r.Proto, Port: r.Port, Action: a})
		}
	}
	bs := b.Spec
	if _, err := LookupChain(bs.Arch, bs.Firmware); err != nil {
		return bad("%v", err)
	}
	s := Spec{Arch: bs.Arch, Firmware: bs.Firmware, Name: bs.Name, MAC: bs.MAC, IP: bs.IP, Family: bs.Family, NIC: bs.NIC, Root: bs.Root, CHAP: bs.CHAP,
		RootDir: bs.RootDir, RootImage: bs.RootImage, ArchiveFromRoot: bs.ArchiveFromRoot,
		Append: bs.Append, NoArchiveRefresh: bs.NoArchiveRefresh, OnStale: bs.OnStale, Compression: bs.Compression,
		Signed: bs.Signed, SecureBoot: bs.SecureBoot, KeepPrompts: bs.KeepPrompts, Expect: bs.Expect, Memory: bs.Memory,
		Timeout: time.Duration(bs.Timeout * float64(time.Second))}
	var err error
	if s.Kernel, err = b.Path(bs.Kernel); err != nil {
		return Options{}, Spec{}, err
	}
	if s.Initrd, err = b.Path(bs.Initrd); err != nil {
		return Options{}, Spec{}, err
	}
	for _, f := range []struct {
		rel string
		dst *string
	}{{bs.LoaderConfig, &s.LoaderConfig}, {bs.Loader, &s.Loader}, {bs.FirmwareCode, &s.FirmwareCode},
		{bs.FirmwareVars, &s.FirmwareVars}, {bs.BIOS, &s.BIOS}, {bs.NICROM, &s.NICROM}} {
		if *f.dst, err = b.Path(f.rel); err != nil {
			return Options{}, Spec{}, err
		}
	}
	for _, rel := range bs.SecureBootCerts {
		p, err := b.Path(rel)
		if err != nil {
			return Options{}, Spec{}, err
		}
		s.SecureBootCerts = append(s.SecureBootCerts, p)
	}
	if bs.RootWritable {
		// A bundle is untrusted: it never makes nbh serve a host path for a
		// guest to write to. The replay serves a copy.
		s.RootWritable = false
	}
	for _, p := range []string{bs.RootDir, bs.RootImage} {
		if _, err := os.Stat(p); p != "" && err != nil {
			return bad("the boot's root was %s, which is not on this machine (a root tree or image is referenced, not carried): put it back there, or edit spec.root_dir / spec.root_image in %s", p, bundle.SpecFile)
		}
	}
	if b.Lab.Serve != "" {
		// A tree is referenced, not carried: it must still be where it was.
		if fi, err := os.Stat(b.Lab.Serve); err != nil || !fi.IsDir() {
			return bad("the boot served the tree %s (--serve), which is not on this machine: put it back there, or copy it and edit lab.serve in %s", b.Lab.Serve, bundle.SpecFile)
		}
		opts.Serve = b.Lab.Serve
	}
	for _, m := range []struct {
		from map[string]string
		to   *map[string]string
	}{{bs.ArchiveFiles, &s.ArchiveFiles}, {bs.RootFiles, &s.RootFiles}} {
		for guestPath, rel := range m.from {
			p, err := b.Path(rel)
			if err != nil {
				return Options{}, Spec{}, err
			}
			if *m.to == nil {
				*m.to = map[string]string{}
			}
			(*m.to)[guestPath] = p
		}
	}
	s.Steps = bs.Steps
	for _, f := range bs.FailOn {
		s.FailOn = append(s.FailOn, FailOn(f))
	}
	for _, name := range bs.Faults {
		f, err := LookupFault(name)
		if err != nil {
			return bad("%v", err)
		}
		s.Faults = append(s.Faults, f)
	}
	for name, secs := range bs.StageTimeouts {
		var st timeline.Stage
		if err := st.UnmarshalText([]byte(name)); err != nil {
			return bad("stage timeout: %v", err)
		}
		if s.StageTimeouts == nil {
			s.StageTimeouts = map[timeline.Stage]time.Duration{}
		}
		s.StageTimeouts[st] = time.Duration(secs * float64(time.Second))
	}
	return opts, s, nil
}

var actions = map[string]ipsec.Action{"bypass": ipsec.Bypass, "protect": ipsec.Protect, "discard": ipsec.Discard}

// BundlePins reads the pins the bundle's guest booted, for Cache.PinsOverride.
func BundlePins(b *bundle.Bundle) (images.PinSet, error) {
	p, err := b.Path(bundle.PinsFile(b.Spec.Arch))
	if err != nil {
		return images.PinSet{}, err
	}
	s, err := images.ReadPins(p)
	if err != nil {
		return images.PinSet{}, fmt.Errorf("%w: %w", bundle.ErrBad, err)
	}
	if s.Arch != b.Spec.Arch {
		return images.PinSet{}, fmt.Errorf("%w: %s holds %s pins", bundle.ErrBad, bundle.PinsFile(b.Spec.Arch), s.Arch)
	}
	return s, nil
}
