// Package images fetches and caches what guests boot: Debian kernels and their
// modules, busybox, firmware and boot loader binaries, per architecture.
//
// Everything comes from Debian's package archive through the ordinary apt
// client, but with private state, list and cache folders inside the cache, so
// the host's dpkg and apt configuration is never changed (arm64 packages are
// fetched on an amd64 host this way). Each package is unpacked into its own
// folder named by package, version and architecture; a folder counts only once
// its ".complete" stamp (holding the .deb's SHA-256, checked against the
// archive's index) is written, so a partial or corrupt entry is fetched again.
// Versions are pinned in the repository (pins-ARCH.json, compiled in): every
// machine fetches the same bytes, and a second run is offline.
package images

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"nbh.dev/nbh/internal/fsutil"
)

// Arches are the guest architectures nbh boots, in Debian's spelling.
func Arches() []string { return []string{"amd64", "arm64", "riscv64"} }

// archSuite is the Debian release an architecture's pins come from,
// whatever the host runs: amd64's and arm64's were resolved in Debian 12
// (bookworm); riscv64 became an official architecture in Debian 13
// (trixie), so every riscv64 package is trixie's. Each is fetched through
// the cache's own sources list for that release (suiteList), so a Debian 13
// host fetches the same Debian 12 packages a Debian 12 host does.
var archSuite = map[string]string{"amd64": "bookworm", "arm64": "bookworm", "riscv64": "trixie"}

// home is where arch's packages come from by default.
func home(arch string) source { return source{arch: arch, suite: archSuite[arch]} }

// Cache is a folder of fetched packages.
type Cache struct {
	Dir string
	// Log receives progress lines; nil means os.Stderr.
	Log io.Writer
	// PinsOverride replaces the compiled-in pins for an architecture
	// (nbh images --update fetches the pins it just resolved).
	PinsOverride map[string]PinSet
	// sourceList replaces the host's apt sources (tests use a local
	// archive).
	sourceList string
}

// DefaultDir is .cache/ in the nbh module this process runs from (tests run
// inside the module tree), else the user cache folder. (The CLI and nbhtest
// take $NBH_CACHE before it.)
func DefaultDir() string {
	if root := moduleRoot(); root != "" {
		return filepath.Join(root, ".cache")
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "nbh")
	}
	return filepath.Join(os.TempDir(), "nbh-cache")
}

// moduleRoot finds the folder of nbh's go.mod above the working directory.
func moduleRoot() string {
	dir, err := os.Getwd()
	if err != nil {
		return ""
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(b, []byte("module nbh.dev/nbh\n")) {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return ""
		}
		dir = parent
	}
}

// Open returns the cache in dir (DefaultDir when empty).
func Open(dir string) *Cache {
	if dir == "" {
		dir = DefaultDir()
	}
	return &Cache{Dir: dir}
}

func (c *Cache) logf(format string, args ...any) {
	w := c.Log
	if w == nil {
		w = os.Stderr
	}
	fmt.Fprintf(w, "images: "+format+"\n", args...)
}

// ErrPinGone is returned when the package archive no longer has a pinned
// version.
var ErrPinGone = errors.New("pin not served")

// ErrMissingTool is returned when apt-get or dpkg-deb is not on PATH.
var ErrMissingTool = errors.New("missing host tool")

// Package returns the folder holding the unpacked contents of the Debian
// package name for arch ("all" packages may be asked for with any arch) at
// its pinned version, fetching it on first use. A name "pkg@suite" is pkg
// from another Debian release's suite (File.Suite).
func (c *Cache) Package(ctx context.Context, arch, name string) (string, error) {
	set, err := c.pins(arch)
	if err != nil {
		return "", err
	}
	p, ok := set.Packages[name]
	if !ok {
		return "", fmt.Errorf("images: package %s (%s) is not pinned in images/%s; run nbh images --update", name, arch, PinsFile(arch))
	}
	src := home(arch)
	if n, suite, ok := strings.Cut(name, "@"); ok {
		name, src.suite = n, suite
	}
	unlock, err := c.lock()
	if err != nil {
		return "", err
	}
	defer unlock()
	dir := c.pkgDir(name, p.Version, arch)
	if stamp, err := os.ReadFile(filepath.Join(dir, ".complete")); err == nil && strings.TrimSpace(string(stamp)) == p.SHA256 {
		return dir, nil
	}
	if err := c.fetch(ctx, src, name, p, dir); err != nil {
		return "", err
	}
	return dir, nil
}

func (c *Cache) pkgDir(name, version, arch string) string {
	return filepath.Join(c.Dir, "pkgs", name+"_"+strings.ReplaceAll(version, ":", "%3a")+"_"+arch)
}

// lock serialises cache writers across processes (parallel tests, CLI runs).
func (c *Cache) lock() (func(), error) {
	unlock, err := fsutil.LockDir(c.Dir)
	if err != nil {
		return nil, fmt.Errorf("images: %w", err)
	}
	return unlock, nil
}

// source is where apt fetches from: a Debian release's suite (its
// -updates and -security suites too) for one architecture, through the
// cache's own sources list.
type source struct {
	arch, suite string
}

func (s source) String() string { return s.arch + ", " + s.suite }

// dir is src's private apt folder under the cache's apt/: amd64-bookworm,
// arm64-trixie.
func (s source) dir() string { return s.arch + "-" + s.suite }

// aptArgs points apt at private folders under the cache for src.
func (c *Cache) aptArgs(ctx context.Context, src source) ([]string, error) {
	base := filepath.Join(c.Dir, "apt", src.dir())
	// The apt state an older nbh kept per architecture alone (apt/amd64),
	// before each release had its own: tens of MB nothing reads.
	os.RemoveAll(filepath.Join(c.Dir, "apt", src.arch))
	for _, d := range []string{"lists/partial", "cache/archives/partial", "etc/preferences.d", "etc/apt.conf.d"} {
		if err := os.MkdirAll(filepath.Join(base, d), 0o755); err != nil {
			return nil, err
		}
	}
	status := filepath.Join(base, "status")
	if _, err := os.Stat(status); err != nil {
		if err := os.WriteFile(status, nil, 0o644); err != nil {
			return nil, err
		}
	}
	var sources []string
	switch {
	case c.sourceList != "":
		sources = []string{"-o", "Dir::Etc::SourceList=" + c.sourceList, "-o", "Dir::Etc::SourceParts=/nonexistent"}
	default:
		list, err := suiteList(ctx, base, src.suite)
		if err != nil {
			return nil, err
		}
		sources = []string{"-o", "Dir::Etc::SourceList=" + list, "-o", "Dir::Etc::SourceParts=/nonexistent"}
	}
	return append(sources,
		"-o", "APT::Architecture="+src.arch,
		"-o", "APT::Architectures="+src.arch,
		"-o", "Dir::State="+base,
		"-o", "Dir::State::Lists="+filepath.Join(base, "lists"),
		"-o", "Dir::State::status="+status,
		"-o", "Dir::Cache="+filepath.Join(base, "cache"),
		"-o", "Dir::Etc::Preferences="+filepath.Join(base, "etc/preferences"),
		"-o", "Dir::Etc::PreferencesParts="+filepath.Join(base, "etc/preferences.d"),
		"-o", "Debug::NoLocking=1",
		"-o", "APT::Sandbox::User="+sandboxUser(),
		"-q",
	), nil
}

// sandboxUser keeps apt from dropping to _apt, which cannot write into a cache
// owned by the invoking user.
func sandboxUser() string {
	if os.Geteuid() == 0 {
		return "root"
	}
	if u := os.Getenv("USER"); u != "" {
		return u
	}
	return "nobody"
}

func (c *Cache) apt(ctx context.Context, dir string, src source, tool string, args ...string) ([]byte, error) {
	if _, err := exec.LookPath(tool); err != nil {
		return nil, fmt.Errorf("images: %w: %s (nbh fetches its images with apt: a Debian host, or another with apt and NBH_DEBIAN_ARCHIVE)", ErrMissingTool, tool)
	}
	base, err := c.aptArgs(ctx, src)
	if err != nil {
		return nil, fmt.Errorf("images: %w", err)
	}
	cmd := exec.CommandContext(ctx, tool, append(base, args...)...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("images: %s %s: %v: %s", tool, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// update refreshes the private package lists of src when they are missing
// (or always, with force).
func (c *Cache) update(ctx context.Context, src source, force bool) error {
	lists := filepath.Join(c.Dir, "apt", src.dir(), "lists")
	if m, _ := filepath.Glob(filepath.Join(lists, "*Packages*")); len(m) > 0 && !force {
		return nil
	}
	c.logf("reading the package index for %s", src)
	_, err := c.apt(ctx, c.Dir, src, "apt-get", "update")
	return err
}

// resolve finds the version and checksum apt would fetch for name. A
// meta-package whose only job is to depend on one versioned package
// (linux-image-amd64) is followed to that package.
func (c *Cache) resolve(ctx context.Context, src source, name string) (Pin, error) {
	out, err := c.apt(ctx, c.Dir, src, "apt-cache", "show", "--no-all-versions", name)
	if err != nil {
		return Pin{}, err
	}
	f := parseStanza(out)
	if f["SHA256"] == "" || f["Version"] == "" {
		return Pin{}, fmt.Errorf("images: apt-cache show %s (%s): no version or checksum", name, src)
	}
	var size int64
	fmt.Sscan(f["Size"], &size)
	return Pin{Version: f["Version"], SHA256: f["SHA256"], Size: size}, nil
}

// KernelPackage names the pinned versioned kernel package of arch.
func (c *Cache) KernelPackage(ctx context.Context, arch string) (string, error) {
	s, err := c.pins(arch)
	if err != nil {
		return "", err
	}
	return s.Kernel, nil
}

// kernelDependency names the versioned kernel package linux-image-ARCH
// depends on in the (fresh) package lists.
func (c *Cache) kernelDependency(ctx context.Context, arch string) (string, error) {
	out, err := c.apt(ctx, c.Dir, home(arch), "apt-cache", "show", "--no-all-versions", "linux-image-"+arch)
	if err != nil {
		return "", err
	}
	dep := strings.TrimSpace(strings.SplitN(parseStanza(out)["Depends"], "(", 2)[0])
	if !strings.HasPrefix(dep, "linux-image-") {
		return "", fmt.Errorf("images: linux-image-%s depends on %q, not a kernel package", arch, dep)
	}
	return dep, nil
}

func parseStanza(b []byte) map[string]string {
	f := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			break
		}
		if k, v, ok := strings.Cut(line, ":"); ok && !strings.HasPrefix(line, " ") {
			f[k] = strings.TrimSpace(v)
		}
	}
	return f
}

// fetch downloads and unpacks one package into dir, replacing whatever was
// there; the .complete stamp is written last.
func (c *Cache) fetch(ctx context.Context, src source, name string, p Pin, dir string) error {
	if err := c.update(ctx, src, false); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(c.Dir, ".fetch-")
	if err != nil {
		return fmt.Errorf("images: %w", err)
	}
	defer os.RemoveAll(tmp)
	c.logf("downloading %s %s (%s, %.1f MB)", name, p.Version, src, float64(p.Size)/1e6)
	start := time.Now()
	stop := c.progress(tmp, name, p.Size)
	_, err = c.apt(ctx, tmp, src, "apt-get", "download", name+"="+p.Version)
	if err != nil && ctx.Err() == nil {
		// The private lists may be older than the pins: read the index
		// again once before deciding the archive lacks the version.
		if err = c.update(ctx, src, true); err == nil {
			_, err = c.apt(ctx, tmp, src, "apt-get", "download", name+"="+p.Version)
		}
		if err != nil && ctx.Err() == nil && !c.served(ctx, src, name, p.Version) {
			err = fmt.Errorf("images: pinned package %s %s (%s) is no longer served by the package archive; "+
				"run nbh images --update to pin the current versions (%w)", name, p.Version, src, ErrPinGone)
		}
	}
	stop()
	if err != nil {
		return err
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return fmt.Errorf("images: apt-get download %s left %d .deb files", name, len(debs))
	}
	sum, err := fsutil.SHA256File(debs[0])
	if err != nil {
		return err
	}
	if sum != p.SHA256 {
		return fmt.Errorf("images: %s: checksum %s, index says %s", debs[0], sum, p.SHA256)
	}
	if err := unpack(ctx, debs[0], sum, dir); err != nil {
		return err
	}
	c.logf("cached %s in %s (%.1fs)", name, dir, time.Since(start).Seconds())
	return nil
}

// unpack extracts deb into dir (replacing it) and writes the .complete
// stamp holding sum, last, so a half-unpacked folder never counts.
func unpack(ctx context.Context, deb, sum, dir string) error {
	if _, err := exec.LookPath("dpkg-deb"); err != nil {
		return fmt.Errorf("images: %w: dpkg-deb", ErrMissingTool)
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".unpack-")
	if err != nil {
		return fmt.Errorf("images: %w", err)
	}
	defer os.RemoveAll(tmp)
	root := filepath.Join(tmp, "root")
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", deb, root).CombinedOutput(); err != nil {
		return fmt.Errorf("images: dpkg-deb -x %s: %v: %s", filepath.Base(deb), err, out)
	}
	if err := os.WriteFile(filepath.Join(root, ".complete"), []byte(sum+"\n"), 0o644); err != nil {
		return err
	}
	os.RemoveAll(dir)
	if err := os.Rename(root, dir); err != nil {
		return fmt.Errorf("images: %w", err)
	}
	return nil
}

// served reports whether the package lists know name at version.
func (c *Cache) served(ctx context.Context, src source, name, version string) bool {
	out, err := c.apt(ctx, c.Dir, src, "apt-cache", "show", "--no-all-versions", name+"="+version)
	return err == nil && parseStanza(out)["Version"] == version
}

// progress reports the growth of the download every few seconds.
func (c *Cache) progress(dir, name string, size int64) func() {
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(3 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				var n int64
				filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
					if err == nil && fi.Mode().IsRegular() {
						n += fi.Size()
					}
					return nil
				})
				if size > 0 {
					c.logf("  %s: %.1f of %.1f MB", name, float64(n)/1e6, float64(size)/1e6)
				}
			}
		}
	}()
	return func() { close(done) }
}

// debianKeyring holds the Debian archive's signing keys, from the
// debian-archive-keyring package apt depends on; Debian 12's has the keys of
// Debian 13 too, and Debian 13's those of Debian 12. $NBH_DEBIAN_KEYRING
// names another file (a host whose distribution is not Debian).
func debianKeyring() string {
	if k := os.Getenv("NBH_DEBIAN_KEYRING"); k != "" {
		return k
	}
	return "/usr/share/keyrings/debian-archive-keyring.gpg"
}

// suiteList writes (under base) the sources list of a Debian release: its
// suite from the archive the host's apt reads its own Debian release from,
// its -updates suite where the host reads one, and its -security suite from
// the host's security archive, signed by Debian's keys. The host's own
// sources are read, never changed.
func suiteList(ctx context.Context, base, suite string) (string, error) {
	a, err := hostArchives(ctx)
	if err != nil {
		return "", err
	}
	keyring := debianKeyring()
	if strings.ContainsAny(keyring, " \t\n[]") {
		return "", fmt.Errorf("images: keyring %q: a path apt's sources line cannot hold", keyring)
	}
	if _, err := os.Stat(keyring); err != nil {
		return "", fmt.Errorf("images: %s, which checks Debian's %s suite, is missing: install debian-archive-keyring (%w)", keyring, suite, err)
	}
	list := filepath.Join(base, "etc", "sources.list")
	text := a.list(keyring, suite)
	if old, err := os.ReadFile(list); err == nil && string(old) == text {
		return list, nil
	}
	return list, os.WriteFile(list, []byte(text), 0o644)
}

// archives are where Debian's suites come from: the archive's URI (Main),
// whether it has the -updates suites, and the security archive's URI
// ("" for none).
type archives struct {
	Main     string
	Updates  bool
	Security string
}

// list is the sources list of the release suite from a.
func (a archives) list(keyring, suite string) string {
	text := fmt.Sprintf("deb [signed-by=%s] %s %s main\n", keyring, a.Main, suite)
	if a.Updates {
		text += fmt.Sprintf("deb [signed-by=%s] %s %s-updates main\n", keyring, a.Main, suite)
	}
	if a.Security != "" {
		text += fmt.Sprintf("deb [signed-by=%s] %s %s-security main\n", keyring, a.Security, suite)
	}
	return text
}

// hostArchives finds the archives the host's apt reads its own Debian
// release from. $NBH_DEBIAN_ARCHIVE and $NBH_DEBIAN_SECURITY (a URI, or
// "none") name them on a host whose apt sources hold no Debian release.
func hostArchives(ctx context.Context) (archives, error) {
	if main := os.Getenv("NBH_DEBIAN_ARCHIVE"); main != "" {
		sec := os.Getenv("NBH_DEBIAN_SECURITY")
		switch sec {
		case "":
			return archives{}, fmt.Errorf("images: NBH_DEBIAN_ARCHIVE is set: set NBH_DEBIAN_SECURITY too, to the URI of Debian's security archive (pinned kernels often come from a -security suite), or to none")
		case "none":
			sec = ""
		}
		if err := checkURI(main); err != nil {
			return archives{}, err
		}
		if sec != "" {
			if err := checkURI(sec); err != nil {
				return archives{}, err
			}
		}
		return archives{Main: main, Updates: true, Security: sec}, nil
	}
	hostSources.Lock()
	defer hostSources.Unlock()
	if hostSources.out == nil {
		// --no-release-info: the sources as configured, even where no
		// list was ever downloaded (a container that removed them).
		out, err := exec.CommandContext(ctx, "apt-get", "indextargets", "--no-release-info", "--format", "$(TARGET_OF) $(IDENTIFIER) $(RELEASE) $(REPO_URI)").Output()
		if err != nil {
			return archives{}, fmt.Errorf("images: apt-get indextargets: %w", err)
		}
		hostSources.out = out
	}
	return parseIndexTargets(string(hostSources.out), debianCodename())
}

// hostSources is the host's apt sources as indextargets lists them, read
// once per process.
var hostSources struct {
	sync.Mutex
	out []byte
}

// debianCodename is the host's Debian release codename (/etc/os-release),
// "" on a host that is not Debian (another distribution's codename names
// its own archive, not Debian's).
func debianCodename() string {
	data, err := os.ReadFile("/etc/os-release")
	if err != nil {
		return ""
	}
	fields := map[string]string{}
	for _, l := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			fields[k] = strings.Trim(strings.TrimSpace(v), `"'`)
		}
	}
	if fields["ID"] != "debian" {
		return ""
	}
	return fields["VERSION_CODENAME"]
}

// debianAliases are the suite names Debian's archives also know a release
// by, which a host's sources may use instead of its codename.
var debianAliases = []string{"stable", "oldstable", "testing", "unstable", "sid"}

// parseIndexTargets picks the host's Debian archives out of apt-get
// indextargets lines ("deb Packages SUITE URI"): the archive of the suite
// that is the host's Debian codename (debianCodename), else of a Debian alias (stable, ...)
// from a URI whose path ends in /debian/ (so a third-party repository's
// "stable" is never taken for Debian's); its -updates suite; and the
// security archive of the same release (SUITE-security).
func parseIndexTargets(out, codename string) (archives, error) {
	type source struct{ suite, uri string }
	var debs []source
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) == 4 && f[0] == "deb" && f[1] == "Packages" {
			debs = append(debs, source{f[2], f[3]})
		}
	}
	var a archives
	release := ""
	for _, d := range debs {
		if codename != "" && d.suite == codename {
			a.Main, release = d.uri, d.suite
			break
		}
	}
	if a.Main == "" {
		for _, d := range debs {
			if slices.Contains(debianAliases, d.suite) && strings.HasSuffix(strings.TrimSuffix(d.uri, "/"), "/debian") {
				a.Main, release = d.uri, d.suite
				break
			}
		}
	}
	if a.Main == "" {
		return archives{}, fmt.Errorf("images: the host's apt sources name no Debian release (none of suite %q, nor stable/oldstable/testing from a .../debian archive): nbh fetches Debian's packages with apt; on another distribution set NBH_DEBIAN_ARCHIVE and NBH_DEBIAN_SECURITY (see Hosts in the README)", codename)
	}
	for _, d := range debs {
		switch d.suite {
		case release + "-updates":
			a.Updates = a.Updates || d.uri == a.Main
		case release + "-security":
			if a.Security == "" {
				a.Security = d.uri
			}
		}
	}
	return a, nil
}

// checkURI refuses a URI that would not stay one field of a sources line.
func checkURI(u string) error {
	if strings.ContainsAny(u, " \t\n[]") || !strings.Contains(u, "://") {
		return fmt.Errorf("images: %q is not an archive URI", u)
	}
	return nil
}
