// Package harness is the lab: it composes one isolated boot network — the
// user-space fabric, the boot services on its host stack, guests in QEMU and
// their artifacts — and is the API that scenarios and the CLI use. Only the
// lab wires services and guests together: a service knows its protocol, a
// guest knows QEMU.
package harness

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"nbh.dev/nbh/harness/bootfile"
	"nbh.dev/nbh/harness/dhcp"
	"nbh.dev/nbh/harness/httpboot"
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/iscsi"
	"nbh.dev/nbh/harness/netfab"
	"nbh.dev/nbh/harness/nfs"
	"nbh.dev/nbh/harness/secureboot"
	"nbh.dev/nbh/harness/sign"
	"nbh.dev/nbh/harness/tftp"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/harness/warm"
	"nbh.dev/nbh/images"
	"nbh.dev/nbh/internal/fsutil"
	"nbh.dev/nbh/internal/rules"
)

// Options configure a lab.
type Options struct {
	// Cache holds images; the default is images.Open("").
	Cache *images.Cache
	// Log receives progress lines (image downloads, acceleration choice);
	// nil discards them.
	Log io.Writer
	// IPsec, if set, makes the network IPsec-required with this policy
	// (ipsec.Required() is the usual one): the lab's ESP gateway sits
	// between the guests and the boot services, every guest gets its own
	// SAs, and the reference archive carries its keys.
	IPsec *ipsec.Policy
	// ESPKeyBits is the AES key size of the guests' SAs: 128 (default) or
	// 256.
	ESPKeyBits int
	// MTU is the network's path MTU (default 1500); see netfab.Config.
	MTU int
	// Seed decides every random choice the lab makes for its guests (ESP
	// SPIs and keys, CHAP secrets), so that a replay of a recorded boot
	// (a repro bundle) makes the same ones; "" picks a fresh one. MACs and
	// addresses follow from the order guests boot in. The seed derives
	// secrets: it is one.
	Seed string
	// Serve is a folder of the user's (menus, second-stage loaders, an
	// installer's netboot tree) merged read-only under what TFTP and HTTP
	// serve: a name the lab has no file for is looked up there, and a name
	// in a guest's folder (GUEST/PATH) also as PATH, so what a loader
	// fetches beside itself is found. The lab's own files come first, and a
	// guest's folder stays its own.
	Serve string
	// ForgetClosed makes a long-lived lab (nbh serve, nbh soak --one-lab)
	// stay flat: a guest's Close also gives back its lease, drops its
	// events from the timeline (they are in its timeline.jsonl), and
	// removes its root, its served files and, unless Spec.Artifacts named
	// them, its artifacts. Without it a closed guest's name can boot again
	// and find its root as it left it, and the timeline keeps every event.
	ForgetClosed bool
	// NFSQuota bounds what each guest adds to its NFS root (bytes of disk
	// and names); zero for nfs.DefaultQuota (2 GiB, 100,000 names).
	NFSQuota nfs.Quota
	// Accel is the guests' acceleration: "" (a probe decides: KVM where a
	// guest really runs under it, else TCG), "kvm" or "tcg".
	Accel string
	// Warm, if set, starts each guest's machine from the store's snapshot
	// of it at its firmware's first request on the network, making the snapshot where there
	// is none (package warm; Guest.WarmStart says how each started). A
	// guest with no firmware, off the lab's network, or whose firmware is
	// made for this lab alone (its Secure Boot db holds the lab's key)
	// starts cold.
	Warm *warm.Store
}

// Lab is one isolated boot network with its services.
type Lab struct {
	tl     *timeline.Timeline
	fabric *netfab.Fabric

	cache *images.Cache
	log   io.Writer
	work  string // private folder, removed on Close
	srv   string // served root of TFTP and HTTP
	files bootfile.Opener
	serve bootfile.Opener // Options.Serve; nil without

	dhcp    *dhcp.Server
	nfs     *nfs.Server
	portmap *nfs.Portmapper
	iscsi   *iscsi.Server

	esp     *ipsec.Gateway // nil on a clear network
	espBits int
	opts    Options // as New completed them (Seed, ESPKeyBits)
	// ctx is the lab's lifetime: work the services start for a guest
	// (an archive rebuilt before a fetch) ends when the lab closes.
	ctx    context.Context
	cancel context.CancelFunc

	keyOnce sync.Once
	key     *sign.Key // the lab's signing key, made on first use
	keyErr  error
	sbOnce  sync.Once
	sbKey   *secureboot.Key // the lab's Secure Boot key, made on first use
	sbErr   error

	mu     sync.Mutex
	guests map[string]*Guest // by MAC
	byName map[string]*Guest // the latest guest of each name
	// provisioning are the guests being provisioned, by name: their
	// files are theirs before they are registered.
	provisioning map[string]*Guest
	n            int
	closed       bool
	closeOnce    sync.Once
	closeErr     error
	closers      []io.Closer // what New and Forward started, in order
}

// New starts a lab: fabric, DHCP, TFTP and HTTP on the fabric host.
func New(opts Options) (l *Lab, err error) {
	if opts.Cache == nil {
		opts.Cache = images.Open("")
	}
	if opts.Log == nil {
		opts.Log = io.Discard
	}
	// The lab's own view of the cache, logging to its log: a cache shared
	// by labs running side by side (nbh matrix -j) is not written to.
	view := *opts.Cache
	view.Log = opts.Log
	opts.Cache = &view
	if opts.Seed == "" {
		opts.Seed = rand.Text()
	}
	sweepStale()
	work, err := os.MkdirTemp("", fmt.Sprintf("nbh-lab-%d-", os.Getpid()))
	if err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	l = &Lab{tl: timeline.New(), cache: opts.Cache, log: opts.Log, work: work, srv: filepath.Join(work, "srv"), guests: map[string]*Guest{}, byName: map[string]*Guest{}, provisioning: map[string]*Guest{}, opts: opts}
	l.ctx, l.cancel = context.WithCancel(context.Background())
	l.tl.SetStager(l.stageOf)
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	if err := os.MkdirAll(l.srv, 0o755); err != nil {
		return nil, err
	}
	if l.fabric, err = netfab.New(l.tl, netfab.Config{MTU: opts.MTU}); err != nil {
		return nil, err
	}
	l.closers = append(l.closers, l.fabric)
	if l.dhcp, err = dhcp.Start(dhcp.Config{
		Network: l.fabric, ServerIP: l.fabric.HostIP, Subnet: l.fabric.Subnet,
		ServerIP6: l.fabric.HostIP6, Prefix6: l.fabric.Prefix6, ServerMAC: l.fabric.HostMAC,
		Policy: l.policy, Timeline: l.tl, MTU: opts.MTU,
	}); err != nil {
		return nil, err
	}
	l.closers = append(l.closers, l.dhcp)
	srvRoot, err := os.OpenRoot(l.srv)
	if err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	l.closers = append(l.closers, srvRoot)
	l.files = bootfile.Root(srvRoot)
	if opts.Serve != "" {
		userRoot, err := os.OpenRoot(opts.Serve)
		if err != nil {
			return nil, fmt.Errorf("lab: serve: %w", err)
		}
		l.closers = append(l.closers, userRoot)
		l.serve = bootfile.Root(userRoot)
	}
	// TFTP and HTTP on both of the host's addresses (IPv6 boots).
	for _, ip := range l.fabric.HostAddrs() {
		tftpd, err := tftp.Start(l.fabric, ip, l.open, l.tl)
		if err != nil {
			return nil, err
		}
		tftpd.FitMTU(l.fabric.MTU())
		l.closers = append(l.closers, tftpd)
		httpd, err := httpboot.Start(l.fabric, netip.AddrPortFrom(ip, 80), l.open, l.tl)
		if err != nil {
			return nil, err
		}
		l.closers = append(l.closers, httpd)
	}
	// NFS, its portmapper and iSCSI on both addresses too (network roots
	// over IPv6).
	nln, err := l.fabric.ListenTCP(nfs.Port)
	if err != nil {
		return nil, fmt.Errorf("lab: nfs: %w", err)
	}
	l.nfs = nfs.Serve(nln, l.tl, opts.NFSQuota)
	l.closers = append(l.closers, l.nfs)
	pln, err := l.fabric.ListenTCP(nfs.PortmapPort)
	if err != nil {
		return nil, fmt.Errorf("lab: portmap: %w", err)
	}
	pcs, err := l.fabric.ListenUDP(nfs.PortmapPort)
	if err != nil {
		pln.Close()
		return nil, fmt.Errorf("lab: portmap: %w", err)
	}
	l.portmap = nfs.ServePortmapper(pln, pcs, l.tl)
	l.closers = append(l.closers, l.portmap)
	iln, err := l.fabric.ListenTCP(iscsi.Port)
	if err != nil {
		return nil, fmt.Errorf("lab: iscsi: %w", err)
	}
	l.iscsi = iscsi.Serve(iln, l.Server(), l.tl)
	l.closers = append(l.closers, l.iscsi)
	if opts.IPsec != nil {
		if err := l.startIPsec(opts.IPsec, opts.ESPKeyBits); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// open is what TFTP and HTTP serve: the served root, where a guest's
// reference archive is kept current before each fetch and damaged or swapped
// in flight as its faults say, and GUEST/files/PATH, the guest's own root
// tree, which the reference init asks for files its archive lacks.
func (l *Lab) open(name, addr string) (*bootfile.File, error) {
	name = canonical(name)
	if own, ok := ownNames[name]; ok && rules.On(rules.OwnBootScript) {
		// U-Boot asks for its script, Debian's signed GRUB for its
		// config, by one name whoever asks: each guest gets its own.
		if g := l.guestAt(addr); g != nil {
			if _, err := os.Stat(filepath.Join(l.srv, g.Name, own)); err == nil {
				name = g.Name + "/" + own
			}
		}
	}
	guest, rest, _ := strings.Cut(name, "/")
	l.mu.Lock()
	g := l.byName[guest]
	l.mu.Unlock()
	owner := l.owner(name)
	// A guest's boot files (its loader config with its command line, its
	// archive with its keys, its root tree) go to that guest only.
	if owner != nil && !owner.speaksFrom(addr) && rules.On(rules.PathOwner) {
		l.tl.Emit(timeline.Event{Source: "lab", Kind: "refused", Addr: addr,
			Msg: fmt.Sprintf("%s asked for %s, which belongs to %s (%s)", addr, name, owner.Name, owner.IP)})
		return nil, fmt.Errorf("%s belongs to another guest: %w", name, fs.ErrPermission)
	}
	if g == nil {
		return l.lookup(name, "", addr)
	}
	if p, ok := strings.CutPrefix(rest, "files/"); ok {
		if g.rootFS == nil {
			return nil, fmt.Errorf("%s has no root tree on the boot server: %w", guest, fs.ErrNotExist)
		}
		return bootfile.Root(g.rootFS)(p, addr)
	}
	if g.keeper == nil || g.keeper.served == "" || rest != filepath.Base(g.keeper.served) {
		return l.lookup(name, rest, addr)
	}
	if err := g.keeper.fresh(l.ctx); err != nil {
		l.tl.Emit(timeline.Event{Source: "archive", Kind: "error", Guest: g.Name, Msg: "refresh before fetch: " + err.Error()})
	}
	f, err := l.files(name, addr)
	if err != nil {
		return nil, err
	}
	return g.keeper.serve(f), nil
}

// canonical is a served name as the file servers' os.Root resolves it, on
// which ownership is decided: "./g2/x", "g2//x" and "/x/../g2/x" are g2's
// "g2/x" (TFTP has made backslashes slashes, HTTP has decoded percent
// escapes and refused "..": each server's own spelling rules come first).
func canonical(name string) string {
	return strings.TrimLeft(path.Clean("/"+name), "/")
}

// guestAt is the guest that speaks from addr, if any.
func (l *Lab) guestAt(addr string) *Guest {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, g := range l.guests {
		if g.speaksFrom(addr) {
			return g
		}
	}
	return nil
}

// owner is the guest a canonical served name belongs to: GUEST/... and
// pxelinux.cfg/01-MAC; nil for what every guest may read.
func (l *Lab) owner(name string) *Guest {
	l.mu.Lock()
	defer l.mu.Unlock()
	if mac, ok := strings.CutPrefix(name, "pxelinux.cfg/01-"); ok {
		mac = strings.ReplaceAll(mac, "-", ":")
		if g := l.guests[mac]; g != nil {
			return g
		}
		for _, g := range l.provisioning {
			if g.MAC.String() == mac {
				return g
			}
		}
		return nil
	}
	guest, _, _ := strings.Cut(name, "/")
	if g := l.byName[guest]; g != nil {
		return g
	}
	return l.provisioning[guest]
}

// speaksFrom reports whether addr is one of the guest's leased addresses.
func (g *Guest) speaksFrom(addr string) bool {
	return addr == g.IP || (g.IP6 != "" && addr == g.IP6)
}

// lookup opens name from the lab's served root, else from the user's
// tree (Options.Serve) as name, else as rest (the path inside a guest's
// folder, when name is in one) — unless rest is itself another guest's
// name (g1/g2/x, g1/pxelinux.cfg/01-MAC of g2): the fallback must not
// undo the ownership open decided.
func (l *Lab) lookup(name, rest, addr string) (*bootfile.File, error) {
	f, err := l.files(name, addr)
	if l.serve == nil || !errors.Is(err, fs.ErrNotExist) {
		return f, err
	}
	if f, uerr := l.serve(name, addr); !errors.Is(uerr, fs.ErrNotExist) || rest == "" {
		return f, uerr
	}
	if o := l.owner(rest); o != nil && !o.speaksFrom(addr) && rules.On(rules.PathOwner) {
		l.tl.Emit(timeline.Event{Source: "lab", Kind: "refused", Addr: addr,
			Msg: fmt.Sprintf("%s asked for %s, whose fallback %s belongs to %s (%s)", addr, name, rest, o.Name, o.IP)})
		return nil, fmt.Errorf("%s belongs to another guest: %w", rest, fs.ErrPermission)
	}
	return l.serve(rest, addr)
}

// signingKey is the lab's signing key, made on first use and stopped (its
// gpg-agent) when the lab closes.
func (l *Lab) signingKey(ctx context.Context) (*sign.Key, error) {
	l.keyOnce.Do(func() {
		l.key, l.keyErr = sign.NewKey(ctx, filepath.Join(l.work, "gpg"))
		if l.keyErr == nil {
			l.mu.Lock()
			l.closers = append(l.closers, l.key)
			l.mu.Unlock()
		}
	})
	return l.key, l.keyErr
}

// secureBootKey is the lab's Secure Boot signing key (made on first use in
// the lab's private folder, removed with it), whose certificate the
// guests' firmware variables enroll in db.
func (l *Lab) secureBootKey() (*secureboot.Key, error) {
	l.sbOnce.Do(func() {
		l.sbKey, l.sbErr = secureboot.NewKey(filepath.Join(l.work, "secureboot"), "nbh lab Secure Boot key")
	})
	return l.sbKey, l.sbErr
}

// Options are the lab's options as New completed them: with the Seed it
// chose, so a replay can pass them back.
func (l *Lab) Options() Options {
	o := l.opts
	o.ESPKeyBits = l.espBits
	return o
}

// Timeline is the lab's record of everything that happened: every guest's
// boots and every service's events.
func (l *Lab) Timeline() *timeline.Timeline { return l.tl }

// Server is the boot server's address as guests see it.
func (l *Lab) Server() string { return l.fabric.HostIP.String() }

// Server6 is the boot server's IPv6 address.
func (l *Lab) Server6() string { return l.fabric.HostIP6.String() }

// server is the boot server as the guest's loaders and init reach it, as a
// URL's host: its IPv6 address in brackets for a guest on IPv6 only.
func (g *Guest) server() string {
	if g.spec.Family == dhcp.V6 {
		return "[" + g.lab.Server6() + "]"
	}
	return g.lab.Server()
}

// Cache is the lab's image cache.
func (l *Lab) Cache() *images.Cache { return l.cache }

// ServedDir is the folder the lab's TFTP and HTTP servers serve: each
// guest's folder and the loader files guests share, as the lab provisions
// them. Another network's servers may serve it to a guest on a tap network
// (Spec.TapNet), with the lab's own names and paths.
func (l *Lab) ServedDir() string { return l.srv }

// policy decides boot files from what a DHCP client says it is.
func (l *Lab) policy(c dhcp.Client) dhcp.Boot {
	l.mu.Lock()
	g := l.guests[c.MAC.String()]
	l.mu.Unlock()
	if g == nil {
		return dhcp.Boot{Why: "unknown client"}
	}
	server := l.Server()
	if c.V6 {
		server = "[" + l.Server6() + "]"
	}
	// The guest's root, for DHCP option 17, without CHAP credentials
	// (a guest with CHAP finds them on its command line). Only
	// operating-system clients get it: iPXE would try to hook a SAN
	// device from a root path before running its script.
	var rootPath string
	switch g.spec.Root {
	case RootNFS:
		rootPath = server + ":" + g.plan.nfsPath
	case RootISCSI:
		rootPath = g.iscsiRoot(!rules.On(rules.NoSecretInDHCP))
	}
	// (A SAN boot's root is the iBFT's: the init gets no root path.)
	if c.VendorClass == "nbh-init" {
		l.initStarted(g)
		b := dhcp.Boot{Why: "the reference init needs no boot file", RootPath: rootPath}
		if rootPath != "" {
			b.Why += "; root path for its " + g.spec.Root + " root"
		}
		return b
	}
	// The guest's chain answers its firmware and loaders; a guest ready
	// for any loader (nbh serve) gets the first chain of its arch that
	// knows the client.
	chains := []Chain{g.chain}
	if g.spec.AnyLoader {
		chains = loaderChains(g.Profile.Arch)
	}
	for _, ch := range chains {
		for _, r := range ch.DHCP {
			if r.Match(c) {
				return r.answer(server, g.Name, g.servedLoader())
			}
		}
	}
	if rootPath != "" && c.Arch == dhcp.ArchNone {
		// An initramfs's own client (klibc ipconfig, dhclient; no
		// option 93, which firmware sends): the root path serves
		// nfsroot=auto, root=dhcp and netroot=dhcp.
		return dhcp.Boot{Why: "an operating system's DHCP client (" + c.String() + "): root path for its " + g.spec.Root + " root", RootPath: rootPath}
	}
	return dhcp.Boot{Why: "no rule for " + c.String()}
}

// Guests are every guest booted in the lab so far, in boot order (a guest
// booted again under its name appears once per boot).
func (l *Lab) Guests() []*Guest {
	l.mu.Lock()
	defer l.mu.Unlock()
	seen := map[*Guest]bool{}
	var out []*Guest
	for _, g := range l.byName {
		seen[g] = true
		out = append(out, g)
	}
	for _, g := range l.guests {
		if !seen[g] {
			seen[g] = true
			out = append(out, g)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].n < out[j].n })
	return out
}

// Forward makes port on the boot server's address a TCP relay to the host
// address to, so guests can reach a server running outside the lab (Debian's
// tgt on loopback, for a comparison). It ends with the lab.
func (l *Lab) Forward(port int, to string) error {
	ln, err := l.fabric.ListenTCPAt(netip.AddrPortFrom(l.fabric.HostIP, uint16(port)))
	if err != nil {
		return fmt.Errorf("lab: forward :%d: %w", port, err)
	}
	l.mu.Lock()
	l.closers = append(l.closers, ln)
	l.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			d, err := net.Dial("tcp", to)
			if err != nil {
				l.tl.Emit(timeline.Event{Source: "lab", Kind: "forward-failed", Msg: err.Error()})
				c.Close()
				continue
			}
			go func() {
				io.Copy(d, c)
				d.Close()
			}()
			go func() {
				io.Copy(c, d)
				c.Close()
			}()
		}
	}()
	return nil
}

// Close stops every guest and service and removes the lab's private files.
// Concurrent calls (a test's cleanup racing a signal handler) all return
// once the lab is gone.
func (l *Lab) Close() error {
	l.closeOnce.Do(func() { l.closeErr = l.close() })
	return l.closeErr
}

func (l *Lab) close() error {
	l.cancel()
	l.mu.Lock()
	l.closed = true
	var gs []*Guest
	for _, g := range l.guests {
		gs = append(gs, g)
	}
	for _, g := range l.byName {
		gs = append(gs, g) // a rebooted guest's earlier self (Close is idempotent)
	}
	l.mu.Unlock()
	for _, g := range gs {
		g.Close()
	}
	// Services stop in the reverse of their start, the fabric last.
	for i := len(l.closers) - 1; i >= 0; i-- {
		l.closers[i].Close()
	}
	return os.RemoveAll(l.work)
}

// place puts a file into the served root: a hard link where possible (the
// cache is never written through it), else a copy. The new file replaces
// dst in one rename: a fetch that already opened dst keeps reading the old
// file whole, and the next one gets the new file whole.
func place(src, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	// Packages ship symlinks (ipxe.efi); link the file they point to, or
	// the served root would hold a link leading out of it.
	src, err := filepath.EvalSymlinks(src)
	if err != nil {
		return err
	}
	tmp := dst + ".new"
	os.Remove(tmp)
	if err := os.Link(src, tmp); err != nil {
		if err := fsutil.CopyFile(src, tmp); err != nil {
			os.Remove(tmp)
			return err
		}
	}
	return os.Rename(tmp, dst)
}

func writeFile(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, data, 0o644)
}

// stageOf is the boot stage a service's event starts, if any: services say
// what happened, the lab says what it means for a boot. A guest's DHCP
// request begins its DHCP stage (at the init's own DHCP, the stage order
// keeps it from counting), a fetch of a boot file its loader stage, a look
// at the portmapper or a mount its root stage, and an iSCSI login the
// loader stage when a SAN-booting guest's loader logs in to its disk.
func (l *Lab) stageOf(e timeline.Event) timeline.Stage {
	switch e.Source {
	case "dhcp":
		switch e.Kind {
		case "discover", "request", "solicit":
			return timeline.DHCP
		case "ignored":
			switch e.Detail["message"] {
			case "discover", "request", "solicit":
				return timeline.DHCP
			}
		}
	case "tftp", "http":
		if e.Kind == "request" {
			return timeline.Loader
		}
	case "portmap":
		if e.Kind == "getport" || e.Kind == "getaddr" {
			return timeline.Root
		}
	case "nfs":
		if e.Kind == "mount" {
			return timeline.Root
		}
	case "iscsi":
		if e.Kind == "login" || e.Kind == "login-failed" {
			if l.sanLoader(e.Addr) {
				return timeline.Loader
			}
			return timeline.Root
		}
	}
	return timeline.None
}

// sanLoader reports whether an iSCSI login from ip is a SAN-booting guest's
// loader: one before its kernel started.
func (l *Lab) sanLoader(ip string) bool {
	l.mu.Lock()
	var g *Guest
	for _, o := range l.guests {
		if o.IP == ip && !o.closed() {
			g = o
		}
	}
	l.mu.Unlock()
	if g == nil || g.spec.Root != RootSANBoot {
		return false
	}
	return g.Reached() < timeline.Kernel
}
