package harness

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"nbh.dev/nbh/fixtures"
	"nbh.dev/nbh/harness/archive"
	"nbh.dev/nbh/harness/bootcfg"
	"nbh.dev/nbh/harness/console"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/iscsi"
	"nbh.dev/nbh/harness/netfab"
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/harness/sign"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/images"
	"nbh.dev/nbh/internal/fsutil"
)

// Spec describes one guest to boot.
type Spec struct {
	Arch     string // amd64 or arm64
	Firmware string // a qemu.Profiles firmware name
	Name     string // guest name; default g1, g2, ...
	// MAC and IP pin the guest's Ethernet and leased address (a replay
	// gets the recorded guest's); default: the lab assigns them in boot
	// order.
	MAC, IP string

	// Root is the root file system: RootNone (the archive only, the
	// default), RootNFS (the lab's NFS export of the reference root) or
	// RootISCSI (the reference root as an ext4 LUN of the lab's target).
	Root string

	// CHAP makes the iSCSI target require one-way CHAP from this guest;
	// the guest is told its credentials on the kernel command line.
	CHAP bool

	Kernel string // kernel image; default: the cached Debian kernel (a relative path is from the working directory)
	Initrd string // boot archive; default: the reference archive
	Append string // added to the kernel command line

	// ArchiveFiles and RootFiles add host files to the reference archive
	// and to the guest's copy of the reference root (guest path -> host path).
	ArchiveFiles map[string]string
	RootFiles    map[string]string

	// NoArchiveRefresh stops the boot server from rebuilding the reference
	// archive when a file it carries a copy of changes on the guest's NFS
	// root (rebuilding is the default; see keeper).
	NoArchiveRefresh bool
	// OnStale is what the reference init does with a stale archive: "stop"
	// (the default: fail with "stale boot archive") or "warn" (boot on).
	OnStale string
	// Compression of the reference archive: "gzip" (default) or "zstd".
	Compression string
	// Signed makes the loader verify what it loads: the lab signs the
	// kernel, the archive and the loader's config with its own key and
	// builds the key into the loader, which refuses anything unsigned or
	// changed. Only GRUB (aavmf-grub) can; see README.
	Signed bool

	Faults []Fault
	// AnyLoader makes the boot server ready for any firmware of the arch:
	// the loader files of every chain, DHCP answering by what the client
	// says it is. For a guest whose QEMU the lab does not start (Provision).
	AnyLoader bool

	// KeepPrompts leaves firmware prompts to run out their timeouts instead
	// of answering them (see console.Responders).
	KeepPrompts bool
	Expect      string        // regexp for success; default: the reference marker
	Memory      int           // MiB; default 1024
	Timeout     time.Duration // overall deadline for Wait; default 180s
	// StageTimeouts bound how long a boot may stay in one stage without
	// reaching the next; entries override DefaultStageTimeouts.
	StageTimeouts map[timeline.Stage]time.Duration

	// Artifacts is the folder for console.log, timeline.jsonl and
	// network.pcapng; default: a folder inside the lab, removed with it.
	Artifacts string
	// OnStage is called (from the lab's goroutines) when the guest reaches
	// a new stage; it must not block.
	OnStage func(timeline.Event)
	// OnEvent is called with each of the guest's timeline events as it
	// happens (and the lab-wide ones); it must not block.
	OnEvent func(timeline.Event)
}

// DefaultStageTimeouts are the per-stage deadlines. A stage that runs past
// its deadline ends the boot with the stage named, well before the overall
// deadline: a UEFI PXE client with no DHCP answer would otherwise retry for
// a minute and then try IPv6 for another.
var DefaultStageTimeouts = map[timeline.Stage]time.Duration{
	timeline.Firmware: 60 * time.Second,
	timeline.DHCP:     30 * time.Second,
	timeline.Loader:   90 * time.Second,
	timeline.Kernel:   60 * time.Second,
	timeline.Init:     60 * time.Second,
	timeline.Root:     60 * time.Second,
}

// Roots a guest can boot.
const (
	RootNone  = ""
	RootNFS   = "nfs"
	RootISCSI = "iscsi"
)

// ISCSITarget is the lab's iSCSI target name for the reference root; each
// guest gets its own copy of the LUN behind it.
const ISCSITarget = "iqn.2026-11.dev.nbh:root"

// iscsiRoot is the guest's root in dracut's netroot= spelling.
func (g *Guest) iscsiRoot() string {
	creds := ""
	if g.chap != nil {
		secret := g.chap.Secret
		if g.plan.badCHAP {
			secret = "not-" + secret
		}
		creds = g.chap.User + ":" + secret + "@"
	}
	return fmt.Sprintf("iscsi:%s%s::%d:0:%s", creds, g.lab.Server(), iscsi.Port, g.plan.iqn)
}

// NFSExport is the lab's NFS export of the reference root; each guest gets
// its own writable copy behind the same path.
const NFSExport = "/nbh/root"

// Guest is a booted guest.
type Guest struct {
	Name    string
	MAC     net.HardwareAddr
	IP      string
	Profile qemu.Profile
	Accel   qemu.Accel
	Dir     string // artifacts folder
	Start   time.Time

	lab     *Lab
	spec    Spec
	plan    plan
	lun     *iscsi.LUN
	chap    *iscsi.CHAP
	keeper  *keeper     // the reference archive; nil for another archive
	rootFS  *os.Root    // the guest's root tree on the host, for lookups (NFS)
	espAddr netip.Addr  // the address its SAs are for (an IPsec network)
	espConf []byte      // the ESP keys its archive carries
	espPeer *ipsec.Peer // its SAs in the lab's gateway
	expect  *regexp.Regexp
	proc    *qemu.Process
	con     *console.Console
	port    *netfab.Port
	logFile *os.File
	private string
	files   qemu.Files // firmware images
	kernel  string     // for a direct boot
	initrd  string
	n       int       // its place in the lab's boot order
	rand    io.Reader // the guest's random choices, from the lab's seed

	mu        sync.Mutex
	reached   timeline.Stage
	since     time.Time // when reached was reached
	waiting   *waiting  // what the boot waits for, if a console line said so
	verdict   *Verdict
	decided   chan struct{}
	closeOnce sync.Once
	closeErr  error
	isClosed  bool
	// dhcpIgnored counts the DHCP messages the no-dhcp fault ignored.
	dhcpIgnored atomic.Int32
}

// Verdict is how a boot ended.
type Verdict struct {
	OK      bool
	Reason  failure.Reason // empty when OK
	Stage   timeline.Stage // where the failure showed; the furthest stage when OK
	Line    string         // the console line that decided, if any
	Detail  string         // further evidence (QEMU's stderr, the last network error)
	Elapsed time.Duration
	Tail    []string // last console lines
}

// Err is nil for a good boot, else an error describing the failure.
func (v Verdict) Err() error {
	if v.OK {
		return nil
	}
	return &BootError{v}
}

// BootError is a failed boot as an error.
type BootError struct{ V Verdict }

func (e *BootError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s at stage %s after %.1fs", e.V.Reason, e.V.Stage, e.V.Elapsed.Seconds())
	if e.V.Line != "" {
		fmt.Fprintf(&b, ": %q", e.V.Line)
	}
	if e.V.Detail != "" {
		fmt.Fprintf(&b, " (%s)", e.V.Detail)
	}
	return b.String()
}

// Boot starts a guest on the lab's network. The returned guest is running;
// call Wait for its verdict and Close (or Lab.Close) to end it.
func (l *Lab) Boot(ctx context.Context, spec Spec) (*Guest, error) {
	g, err := l.provision(ctx, spec)
	if err != nil {
		return nil, err
	}
	if err := g.start(); err != nil {
		return nil, err
	}
	return g, nil
}

// Provision makes everything a guest boots from — its address, boot files,
// root, keys and faults — without starting QEMU: for a QEMU the user starts
// (nbh serve), which joins through Listen's socket with spec.MAC, with the
// command line QEMUArgs gives. Such a guest has a timeline, stages and
// artifacts, but no console and so no verdict.
func (l *Lab) Provision(ctx context.Context, spec Spec) (*Guest, error) {
	if spec.Firmware == qemu.Direct {
		return nil, fmt.Errorf("spec: a direct boot has no network boot to serve; pick a chain with firmware")
	}
	return l.provision(ctx, spec)
}

// provision is Boot up to QEMU.
func (l *Lab) provision(ctx context.Context, spec Spec) (_ *Guest, err error) {
	// A failure part-way gives back what was already set up: a guest not
	// registered yet is not one Lab.Close would find.
	var made *Guest
	defer func() {
		if err != nil && made != nil {
			made.release()
		}
	}()
	prof, err := qemu.Lookup(spec.Arch, spec.Firmware)
	if err != nil {
		return nil, err
	}
	var p plan
	for _, f := range spec.Faults {
		if f.Applies != nil && !f.Applies(prof, spec.Root) {
			return nil, fmt.Errorf("fault %s does not apply to %s", f.Name, prof.Name())
		}
		if f.IPsec && l.esp == nil {
			return nil, fmt.Errorf("fault %s needs a network that requires IPsec (--ipsec required)", f.Name)
		}
		if f.Where == "archive" && spec.Initrd != "" {
			return nil, fmt.Errorf("fault %s changes the reference archive; this boot uses %s", f.Name, spec.Initrd)
		}
		f.apply(&p)
	}
	switch spec.OnStale {
	case "", "stop", "warn":
	default:
		return nil, fmt.Errorf("on-stale %q: want stop or warn", spec.OnStale)
	}
	switch spec.Compression {
	case "", "gzip", "zstd":
	default:
		return nil, fmt.Errorf("compression %q: want gzip or zstd", spec.Compression)
	}
	if spec.Signed {
		p.sign = true
	}
	if p.sign && !canVerify(prof, spec.Root) {
		return nil, fmt.Errorf("signed boot: %s's loader cannot verify signatures; only arm64/aavmf-grub (GRUB with an embedded key) can", prof.Name())
	}
	switch spec.Root {
	case RootNone, RootNFS, RootISCSI:
	default:
		return nil, fmt.Errorf("root %q: want none, %q or %q", spec.Root, RootNFS, RootISCSI)
	}
	if spec.Expect == "" {
		spec.Expect = regexp.QuoteMeta(fixtures.Marker)
		if spec.Root != RootNone {
			spec.Expect = regexp.QuoteMeta(fixtures.RootMarker)
		}
	}
	if p.nfsPath == "" {
		p.nfsPath = NFSExport
	}
	if p.iqn == "" {
		p.iqn = ISCSITarget
	}
	expect, err := regexp.Compile(spec.Expect)
	if err != nil {
		return nil, fmt.Errorf("expect: %w", err)
	}
	if spec.Timeout == 0 {
		spec.Timeout = 180 * time.Second
	}
	// QEMU runs in the guest's private folder: paths become absolute here.
	if err := absPaths(&spec); err != nil {
		return nil, err
	}
	var wantMAC net.HardwareAddr
	if spec.MAC != "" {
		if wantMAC, err = net.ParseMAC(spec.MAC); err != nil || len(wantMAC) != 6 {
			return nil, fmt.Errorf("spec: MAC %q: want an Ethernet address like 52:54:00:12:34:56", spec.MAC)
		}
	}
	var wantIP netip.Addr
	if spec.IP != "" {
		if wantIP, err = netip.ParseAddr(spec.IP); err != nil {
			return nil, fmt.Errorf("spec: IP: %w", err)
		}
	}

	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, errors.New("lab is closed")
	}
	l.n++
	n := l.n
	l.mu.Unlock()
	if spec.Name == "" {
		spec.Name = fmt.Sprintf("g%d", n)
	}
	mac, err := guestMAC(n)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	if old := l.byName[spec.Name]; old != nil {
		if !old.closed() {
			l.mu.Unlock()
			return nil, fmt.Errorf("guest %s is still running; close it before booting it again", spec.Name)
		}
		mac = old.MAC // the same machine, rebooted
	}
	if wantMAC != nil {
		mac = wantMAC
	}
	for _, other := range l.guests {
		if other.MAC.String() == mac.String() && other.Name != spec.Name {
			l.mu.Unlock()
			return nil, fmt.Errorf("spec: MAC %s is guest %s's", mac, other.Name)
		}
	}
	l.mu.Unlock()
	g := &Guest{
		Name: spec.Name, Profile: prof, lab: l, spec: spec, expect: expect,
		MAC: mac, n: n,
		decided: make(chan struct{}),
	}
	made = g
	g.private = filepath.Join(l.work, "guest-"+g.Name)
	g.Dir = spec.Artifacts
	if g.Dir == "" {
		g.Dir = filepath.Join(l.work, "artifacts-"+g.Name)
	}
	for _, d := range []string{g.private, g.Dir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("lab: %w", err)
		}
	}
	g.rand = guestRand(l.opts.Seed, g.Name, g.MAC)
	if wantIP.IsValid() {
		if err := l.dhcp.Reserve(g.MAC, wantIP); err != nil {
			return nil, err
		}
	}
	ip, err := l.dhcp.Lease(g.MAC)
	if err != nil {
		return nil, err
	}
	g.IP = ip.String()
	l.Timeline.Name(g.MAC.String(), g.Name)
	l.Timeline.Name(g.IP, g.Name)
	l.dhcp.Ignore(g.MAC, p.dhcpSilent)

	g.plan = p
	if l.esp != nil {
		if g.espConf, err = g.espKeys(); err != nil {
			return nil, err
		}
		if p.espReplay {
			l.Fabric.AddRule(netfab.Rule{Name: "esp-replay", Guest: g.Name, Dir: netfab.FromGuest, Proto: "esp", Action: netfab.Replay, Delay: 20 * time.Millisecond})
		}
	}
	if err := g.prepareRoot(ctx); err != nil {
		return nil, err
	}
	kernel, initrd, err := g.bootFiles(ctx, p)
	if err != nil {
		return nil, err
	}
	if g.files, err = g.firmwareFiles(ctx); err != nil {
		return nil, err
	}
	g.kernel, g.initrd = kernel, initrd

	l.mu.Lock()
	l.guests[g.MAC.String()] = g
	l.byName[g.Name] = g
	l.mu.Unlock()
	l.Timeline.Subscribe(g.observe)
	l.Timeline.Subscribe(g.conclude)
	if spec.OnEvent != nil {
		l.Timeline.Subscribe(func(e timeline.Event) {
			if e.Guest == g.Name || e.Guest == "" {
				spec.OnEvent(e)
			}
		})
	}

	g.Accel = qemu.Probe(spec.Arch)
	return g, nil
}

// start runs the provisioned guest's QEMU on a port of the fabric, with the
// console, the monitor of its lines and the stage deadlines.
func (g *Guest) start() error {
	l := g.lab
	var err error
	if g.port, err = l.Fabric.AddPort(g.Name, g.MAC, filepath.Join(g.Dir, "network.pcapng")); err != nil {
		g.Close()
		return err
	}
	if ip, err := netip.ParseAddr(g.IP); err == nil {
		g.port.Bind(ip) // it speaks from its lease only
	}
	if g.logFile, err = os.Create(filepath.Join(g.Dir, "console.log")); err != nil {
		g.Close()
		return err
	}
	fmt.Fprintf(l.log, "lab: %s: %s, acceleration %s (%s)\n", g.Name, g.Profile.Name(), g.Accel.Name, g.Accel.Why)
	g.Start = time.Now()
	if g.con, err = console.New(g.logFile, g.Start); err != nil {
		g.Close()
		return err
	}
	g.proc, err = qemu.Start(g.qemuConfig(""), g.con.Tty(), g.port.QEMUFile())
	if err != nil {
		g.con.Tty().Close()
		g.Close()
		return err
	}
	g.con.Started()
	g.port.QEMUFile().Close()
	l.Timeline.Emit(timeline.Event{Source: "qemu", Kind: "start", Guest: g.Name, Stage: timeline.Firmware, Time: g.Start,
		Msg: g.Profile.Name(), Detail: map[string]any{"argv": strings.Join(g.proc.Args, " "), "accel": g.Accel.Name, "pid": g.proc.Pid()}})
	go g.monitor()
	go g.watch()
	return nil
}

// qemuConfig is how QEMU runs the guest: on an inherited socket (socket
// ""), or joining the lab through the unix socket at socket.
func (g *Guest) qemuConfig(socket string) qemu.Config {
	return qemu.Config{
		Profile: g.Profile, Accel: g.Accel, Memory: g.spec.Memory, MAC: g.MAC.String(), Files: g.files,
		Kernel: g.kernel, Initrd: g.initrd, Append: g.cmdline(),
		Dir: g.private, QMP: filepath.Join(g.private, "qmp.sock"), NetSocket: socket,
	}
}

// QEMUArgs is the command line (binary first) of a QEMU outside the lab
// that boots the provisioned guest, joining the lab through the unix socket
// Listen made at socket. Its console and monitor are on its own terminal.
func (g *Guest) QEMUArgs(socket string) ([]string, error) {
	args, err := qemu.Args(g.qemuConfig(socket))
	if err != nil {
		return nil, err
	}
	return append([]string{qemu.Binary(g.Profile.Arch)}, args...), nil
}

// prepareRoot builds the guest's root, once per guest name in the lab: a
// guest booted again under the same name gets the same root back, as a
// machine rebooting would, with whatever it wrote.
func (g *Guest) prepareRoot(ctx context.Context) error {
	l := g.lab
	base := filepath.Join(l.work, "roots", g.Name)
	switch g.spec.Root {
	case RootNFS:
		if _, err := os.Stat(base); err != nil {
			tmp := base + ".tmp"
			os.RemoveAll(tmp)
			if err := fixtures.BuildRoot(ctx, l.cache, g.Profile.Arch, tmp, g.spec.RootFiles); err != nil {
				return err
			}
			if err := os.Rename(tmp, base); err != nil {
				return err
			}
		}
		if err := l.nfs.Export(NFSExport, g.IP, base); err != nil {
			return err
		}
		root, err := os.OpenRoot(base)
		if err != nil {
			return err
		}
		g.rootFS = root
	case RootISCSI:
		img := base + ".img"
		if _, err := os.Stat(img); err != nil {
			size := int64(64 << 20)
			for _, src := range g.spec.RootFiles {
				if fi, err := os.Stat(src); err == nil {
					size += fi.Size() + fi.Size()/8
				}
			}
			if err := os.MkdirAll(filepath.Dir(img), 0o755); err != nil {
				return err
			}
			if err := fixtures.BuildRootImage(ctx, l.cache, g.Profile.Arch, img+".tmp", size, g.spec.RootFiles); err != nil {
				return err
			}
			if err := os.Rename(img+".tmp", img); err != nil {
				return err
			}
		}
		lun, err := iscsi.OpenLUN(img, g.Name)
		if err != nil {
			return err
		}
		g.lun = lun
		var chap *iscsi.CHAP
		if g.spec.CHAP || g.plan.badCHAP {
			secret := make([]byte, 8)
			io.ReadFull(g.rand, secret)
			chap = &iscsi.CHAP{User: "nbh-" + g.Name, Secret: hex.EncodeToString(secret)}
			g.chap = chap
		}
		l.iscsi.Export(ISCSITarget, g.IP, lun, chap)
	}
	return nil
}

// cmdline is the kernel command line every chain passes.
func (g *Guest) cmdline() string {
	s := "console=" + qemu.Console(g.Profile.Arch) + " panic=-1"
	if g.Profile.Arch == "amd64" {
		s += " edd=off" // the real-mode EDD probe costs ~2 s under TCG
	}
	if !strings.Contains(" "+g.spec.Append, " root=") && !strings.Contains(" "+g.spec.Append, " netroot=") {
		switch g.spec.Root {
		case RootNFS:
			s += fmt.Sprintf(" root=/dev/nfs nfsroot=%s:%s,vers=3,tcp ip=dhcp", g.lab.Server(), g.plan.nfsPath)
		case RootISCSI:
			// ip=dhcp is for stock initramfs images (dracut brings the
			// network up only when told); the reference init ignores it.
			s += " root=/dev/sda netroot=" + g.iscsiRoot() + " ip=dhcp"
		}
	}
	if g.keeper != nil {
		// The reference init asks the boot server for files its archive
		// lacks, and stops on a stale archive unless told to warn.
		s += fmt.Sprintf(" nbh.files=http://%s/%s/files", g.lab.Server(), g.Name)
		if g.plan.warn || g.spec.OnStale == "warn" {
			s += " nbh.archive=warn"
		}
	}
	if g.spec.Append != "" {
		s += " " + g.spec.Append
	}
	return s
}

// skewedKernel names a kernel version the archive's modules are recorded for
// in the module-skew fault: the same release with another ABI number.
func skewedKernel(v string) string {
	if i := strings.Index(v, "-"); i > 0 {
		return v[:i] + "-0-nbh-skew"
	}
	return v + "-nbh-skew"
}

// rootDriver is the module a root cannot be mounted without.
var rootDriver = map[string]string{RootNFS: "nfsv3", RootISCSI: "iscsi_tcp"}

// referenceArchive builds the guest's reference archive and the keeper that
// serves it, and returns its path. A network (NFS) root's archive carries a
// copy of the root's editable configuration, which the keeper keeps current;
// a local (iSCSI) root's carries none: the init reads it from the root.
func (g *Guest) referenceArchive(ctx context.Context, k *images.Kernel, p plan) (string, error) {
	opts := fixtures.Options{Extra: g.spec.ArchiveFiles, Compression: g.spec.Compression}
	if g.lab.esp != nil {
		// The ESP modules always; the keys unless a fault leaves them out.
		// An archive with keys is built in the lab's own cache, which goes
		// with the lab: keys are never kept.
		opts.ESP = true
		if g.espConf != nil {
			opts.Secrets = map[string][]byte{ESPConfPath: g.espConf}
			opts.CacheDir = filepath.Join(g.lab.work, "archives")
		}
	}
	if g.spec.Root == RootNFS {
		opts.Root = filepath.Join(g.lab.work, "roots", g.Name)
		opts.Tracked = []archive.Tracked{{Path: fixtures.ConfigPath, Editable: true}}
	}
	if p.skew {
		opts.Kernel = skewedKernel(k.Version)
	}
	if p.missingModule {
		opts.OmitModules = []string{rootDriver[g.spec.Root]}
	}
	kp := &keeper{g: g, k: k, opts: opts, refresh: !g.spec.NoArchiveRefresh && !p.noRefresh}
	if g.Profile.Firmware != qemu.Direct {
		kp.served = filepath.Join(g.lab.srv, g.Name, "initrd.img")
	}
	kp.mu.Lock()
	err := kp.build(ctx, "build", "boot of "+g.Name)
	kp.mu.Unlock()
	if err != nil {
		return "", err
	}
	if p.editConfig {
		if err := kp.edit("site=changed-after-the-archive-was-built"); err != nil {
			return "", err
		}
	}
	g.keeper = kp
	if kp.served == "" {
		// QEMU loads the archive itself: this is the fetch.
		if err := kp.fresh(ctx); err != nil {
			return "", err
		}
	}
	return kp.path(), nil
}

// bootFiles prepares the kernel and archive, and the loader configs in the
// served root, according to the plan.
func (g *Guest) bootFiles(ctx context.Context, p plan) (kernel, initrd string, err error) {
	l := g.lab
	kernel, initrd = g.spec.Kernel, g.spec.Initrd
	if kernel == "" || initrd == "" {
		k, err := l.cache.Kernel(ctx, g.Profile.Arch)
		if err != nil {
			return "", "", err
		}
		if kernel == "" {
			kernel = k.Image
		}
		if initrd == "" {
			if initrd, err = g.referenceArchive(ctx, k, p); err != nil {
				return "", "", err
			}
		}
	}
	if g.Profile.Firmware == qemu.Direct {
		return kernel, initrd, nil
	}
	dir := filepath.Join(l.srv, g.Name)
	if !p.noKernel {
		if err := place(kernel, filepath.Join(dir, "vmlinuz")); err != nil {
			return "", "", fmt.Errorf("lab: %w", err)
		}
	}
	if g.keeper == nil {
		if err := place(initrd, filepath.Join(dir, "initrd.img")); err != nil {
			return "", "", fmt.Errorf("lab: %w", err)
		}
	}
	b := bootcfg.Boot{Server: l.Server(), Kernel: g.Name + "/vmlinuz", Initrd: g.Name + "/initrd.img", Cmdline: g.cmdline()}
	if p.loaderNFS {
		// Where a system that keeps its boot files on its root has them.
		b.NFS, b.Kernel, b.Initrd = p.nfsPath, "boot/vmlinuz", "boot/initrd.img"
	}
	firmwares := []string{g.Profile.Firmware}
	if g.spec.AnyLoader {
		firmwares = nil
		for _, c := range qemu.Profiles {
			if c.Arch == g.Profile.Arch && c.Firmware != qemu.Direct {
				firmwares = append(firmwares, c.Firmware)
			}
		}
	}
	for _, fw := range firmwares {
		if err = g.loaderFiles(ctx, fw, dir, b, p); err != nil {
			return "", "", fmt.Errorf("lab: %s boot files: %w", fw, err)
		}
	}
	return kernel, initrd, nil
}

// loaderFiles writes what firmware fw's loader reads: its script or config,
// and the loader image where the lab makes one.
func (g *Guest) loaderFiles(ctx context.Context, fw, dir string, b bootcfg.Boot, p plan) (err error) {
	l := g.lab
	switch fw {
	case qemu.SeaBIOSIPXE, qemu.OVMFIPXE, qemu.OVMFPXE:
		err = writeFile(filepath.Join(dir, "boot.ipxe"), []byte(bootcfg.IPXEScript(b)))
		if err == nil && fw == qemu.OVMFPXE {
			var src string
			if src, err = l.cache.Path(ctx, "amd64", images.IPXEEFI); err == nil {
				err = place(src, filepath.Join(l.srv, "ipxe.efi"))
			}
		}
	case qemu.UBoot:
		mac := strings.ReplaceAll(g.MAC.String(), ":", "-")
		err = writeFile(filepath.Join(l.srv, "pxelinux.cfg", "01-"+mac), []byte(bootcfg.PXELinux(b)))
		if err == nil {
			l.mu.Lock()
			if p.loaderNFS {
				l.ubootNFS[g.MAC.String()] = b
			}
			script := bootcfg.UBootScript(l.ubootNFS)
			err = fsutil.WriteAtomic(filepath.Join(l.srv, "boot.scr.uimg"), bootcfg.UBootImage("nbh boot script", script))
			l.mu.Unlock()
		}
	case qemu.AAVMFGRUB:
		cfg := filepath.Join(dir, "grub", "grub.cfg")
		err = writeFile(cfg, []byte(bootcfg.GRUBConfig(b)))
		var pubkey string
		if err == nil && p.sign {
			var key *sign.Key
			if key, err = l.signingKey(ctx); err == nil {
				pubkey = key.Public
				files := []string{cfg, filepath.Join(dir, "vmlinuz")}
				if g.keeper == nil {
					// The keeper signs the reference archive each time it
					// serves a build; another archive is signed here.
					files = append(files, filepath.Join(dir, "initrd.img"))
				}
				for _, f := range files {
					if _, serr := os.Stat(f); serr != nil {
						continue // missing-kernel: nothing to sign
					}
					if err = key.Sign(ctx, f); err != nil {
						break
					}
				}
			}
		}
		if err == nil {
			var mods string
			if mods, err = l.cache.Path(ctx, "arm64", images.GRUBArm64); err == nil {
				err = bootcfg.GRUBImage(ctx, mods, "(tftp)/"+g.Name+"/grub", filepath.Join(dir, "grubnetaa64.efi"), pubkey)
			}
		}
	}
	return err
}

func (g *Guest) firmwareFiles(ctx context.Context) (qemu.Files, error) {
	var f qemu.Files
	c := g.lab.cache
	get := func(dst *string, arch string, file images.File) error {
		p, err := c.Path(ctx, arch, file)
		*dst = p
		return err
	}
	var err error
	switch g.Profile.Firmware {
	case qemu.OVMFIPXE, qemu.OVMFPXE:
		err = errors.Join(get(&f.OVMFCode, "amd64", images.OVMFCode), get(&f.OVMFVars, "amd64", images.OVMFVars))
	case qemu.UBoot:
		if err = get(&f.UBoot, "arm64", images.UBoot); err == nil {
			f.UBootEnv, err = g.ubootEnv(f.UBoot)
		}
	case qemu.AAVMFGRUB:
		err = get(&f.AAVMF, "arm64", images.AAVMF)
	}
	return f, err
}

// ubootEnv writes the guest's U-Boot environment flash: the default
// environment with its MAC address (U-Boot 2023.01 reads a virtio NIC's MAC
// as its first byte six times over, 52:52:52:52:52:52, so DHCP leases and
// pxelinux.cfg/01-MAC would miss) and no autoboot delay.
func (g *Guest) ubootEnv(ubootBin string) (string, error) {
	bin, err := os.ReadFile(ubootBin)
	if err != nil {
		return "", err
	}
	env, err := bootcfg.UBootEnv(bin, map[string]string{"ethaddr": g.MAC.String(), "bootdelay": "0"})
	if err != nil {
		return "", err
	}
	path := filepath.Join(g.private, "uboot-env.fd")
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if _, err := f.Write(env); err != nil {
		return "", err
	}
	return path, f.Truncate(bootcfg.UBootFlashSize)
}

// observe follows the guest's events on the lab timeline.
func (g *Guest) observe(e timeline.Event) {
	if e.Guest != g.Name || e.Stage == timeline.None {
		return
	}
	g.mu.Lock()
	advanced := e.Stage > g.reached
	if advanced {
		g.reached, g.since = e.Stage, e.Time
		g.waiting = nil // the boot moved on
	}
	g.mu.Unlock()
	if advanced && g.spec.OnStage != nil {
		g.spec.OnStage(e)
	}
}

// watch ends the boot when it stays in one stage past that stage's deadline.
func (g *Guest) watch() {
	limits := map[timeline.Stage]time.Duration{}
	for st, d := range DefaultStageTimeouts {
		limits[st] = d
	}
	for st, d := range g.spec.StageTimeouts {
		limits[st] = d
	}
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-g.decided:
			return
		case <-t.C:
		}
		g.mu.Lock()
		st, since := g.reached, g.since
		g.mu.Unlock()
		if since.IsZero() {
			since = g.Start
		}
		if d, ok := limits[st]; ok && d > 0 && time.Since(since) > d {
			g.lab.Timeline.Emit(timeline.Event{Source: "lab", Kind: "stage-deadline", Guest: g.Name, Msg: fmt.Sprintf("stage %s ran past %s", st, d)})
			g.decide(Verdict{Reason: failure.Deadline, Stage: st, Detail: fmt.Sprintf("no progress past stage %s for %s", st, d)})
			return
		}
	}
}

// Reached is the furthest stage so far.
func (g *Guest) Reached() timeline.Stage {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.reached
}

// monitor reads console lines: stage markers go on the timeline, and the
// first line that matches the marker or the failure table decides the boot.
func (g *Guest) monitor() {
	tl := g.lab.Timeline
	var recent []string
	for line := range g.con.Lines() {
		before := recent
		recent = append(recent, line.Text)
		if len(recent) > console.Context {
			recent = recent[1:]
		}
		if r, ok := console.Respond(line.Text); ok && !g.spec.KeepPrompts {
			if err := g.con.Send(r.Send); err == nil {
				tl.Emit(timeline.Event{Source: "console", Kind: "responded", Guest: g.Name, Time: line.Time, Msg: r.Why})
			}
		}
		if st := console.StageOf(line.Text); st != timeline.None && st > g.Reached() {
			tl.Emit(timeline.Event{Source: "console", Kind: "stage", Guest: g.Name, Stage: st, Time: line.Time, Msg: line.Text})
		}
		g.noteWait(line)
		if g.expect.MatchString(line.Text) {
			tl.Emit(timeline.Event{Source: "console", Kind: "marker", Guest: g.Name, Stage: timeline.Marker, Time: line.Time, Msg: line.Text})
			g.decide(Verdict{OK: true, Stage: timeline.Marker, Line: line.Text})
			continue
		}
		if p, ok := console.Classify(line.Text, g.Reached(), before); ok {
			st := p.Stage
			if st == timeline.None {
				st = g.Reached()
			}
			tl.Emit(timeline.Event{Source: "console", Kind: "failure", Guest: g.Name, Time: line.Time, Msg: line.Text,
				Detail: map[string]any{"reason": string(p.Reason), "by": p.Who, "stage": st.String()}})
			g.decide(Verdict{Reason: p.Reason, Stage: st, Line: line.Text})
		}
	}
	// The console ended: QEMU exited.
	err := g.proc.ExitError()
	tl.Emit(timeline.Event{Source: "qemu", Kind: "exit", Guest: g.Name, Msg: fmt.Sprint(err)})
	if stderr := g.proc.Stderr(); err != nil && stderr != "" {
		g.decide(Verdict{Reason: failure.QEMUFailed, Stage: g.Reached(), Detail: stderr})
		return
	}
	g.decide(Verdict{Reason: failure.GuestStopped, Stage: g.Reached()})
}

func (g *Guest) decide(v Verdict) {
	if !v.OK {
		v = g.refine(v)
		if v.Detail == "" {
			v.Detail = g.evidence()
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.verdict != nil {
		return
	}
	v.Elapsed = time.Since(g.Start)
	g.verdict = &v
	close(g.decided)
}

// refine corrects a console-based verdict with what the network saw: a
// loader that says "nothing to boot" when the DHCP server never answered it
// failed for want of a lease; a loader error right after the server said
// "not found" was a failed fetch. Consoles differ by firmware and version;
// the timeline does not.
func (g *Guest) refine(v Verdict) Verdict {
	if v.Reason == failure.Deadline {
		g.mu.Lock()
		w := g.waiting
		g.mu.Unlock()
		if w != nil {
			if w.Stage != timeline.None {
				v.Stage = w.Stage
			}
			v.Reason, v.Line = w.Reason, w.line
			v.Detail = joinDetail(fmt.Sprintf("%s was still at this after %.0fs, at the deadline", w.Who, time.Since(w.since).Seconds()), v.Detail)
			v.Detail = joinDetail(v.Detail, g.evidence())
			return v
		}
	}
	if v.Stage > timeline.Loader {
		return v
	}
	switch v.Reason {
	case failure.LoaderFetch, failure.LoaderError, failure.FirmwareNoBoot, failure.Deadline, failure.GuestStopped:
	default:
		return v
	}
	var asked, answered bool
	var lastFetch *timeline.Event
	for _, e := range g.lab.Timeline.Events(g.Name) {
		switch {
		case e.Source == "dhcp" && (e.Kind == "discover" || e.Kind == "ignored"):
			asked = true
		case e.Source == "dhcp" && e.Kind == "ack":
			answered = true
		case (e.Source == "tftp" || e.Source == "http") && (e.Kind == "transfer" || e.Kind == "not-found"):
			lastFetch = &e
		}
	}
	if asked && !answered {
		v.Detail = joinDetail(v.Detail, "the DHCP server never acknowledged this guest")
		v.Reason, v.Stage = failure.NoDHCP, timeline.DHCP
		return v
	}
	if v.Reason == failure.LoaderError && lastFetch != nil && lastFetch.Kind == "not-found" {
		v.Detail = joinDetail(v.Detail, "the server had no "+lastFetch.Msg)
		v.Reason = failure.LoaderFetch
	}
	return v
}

// waiting is a wait the console announced (console.Waits).
type waiting struct {
	console.Wait
	line  string
	since time.Time
}

// noteWait follows the console's waits: a line that starts one, a later
// line that ends it.
func (g *Guest) noteWait(line console.Line) {
	w, starts := console.Waiting(line.Text)
	g.mu.Lock()
	if cur := g.waiting; cur != nil && cur.Until != nil && cur.Until.MatchString(line.Text) {
		g.waiting = nil
	}
	again := false
	if starts {
		since := line.Time
		if cur := g.waiting; cur != nil && cur.Re == w.Re {
			since, again = cur.since, true // the same wait again: a retry loop
		}
		g.waiting = &waiting{Wait: w, line: line.Text, since: since}
	}
	g.mu.Unlock()
	if starts && !again {
		g.lab.Timeline.Emit(timeline.Event{Source: "console", Kind: "waiting", Guest: g.Name, Time: line.Time, Msg: line.Text,
			Detail: map[string]any{"for": string(w.Reason), "by": w.Who}})
	}
}

func joinDetail(a, b string) string {
	if a == "" || b == "" {
		return a + b
	}
	return a + "; " + b
}

// evidence is the guest's last telling network event, for a verdict's detail.
func (g *Guest) evidence() string {
	evs := g.lab.Timeline.Events(g.Name)
	for i := len(evs) - 1; i >= 0; i-- {
		e := evs[i]
		switch e.Kind {
		case "ignored", "not-found", "aborted", "refused", "error", "nak", "fired", "login-failed", "mount-refused":
			return fmt.Sprintf("last %s event: %s %s", e.Source, e.Kind, e.Msg)
		}
	}
	return ""
}

// Wait returns the verdict: the first of the marker, a classified failure,
// QEMU's exit, the spec's deadline or ctx's end. It never blocks past the
// deadline.
func (g *Guest) Wait(ctx context.Context) Verdict {
	deadline := time.NewTimer(time.Until(g.Start.Add(g.spec.Timeout)))
	defer deadline.Stop()
	select {
	case <-g.decided:
	case <-deadline.C:
		g.decide(Verdict{Reason: failure.Deadline, Stage: g.Reached(),
			Detail: fmt.Sprintf("no marker and no classified failure within %s", g.spec.Timeout)})
	case <-ctx.Done():
		g.decide(Verdict{Reason: failure.Interrupted, Stage: g.Reached(), Detail: ctx.Err().Error()})
	}
	g.mu.Lock()
	v := *g.verdict
	g.mu.Unlock()
	if v.OK {
		// The reference init powers off after the marker; give it a moment
		// so the console and capture are complete.
		select {
		case <-g.proc.Exited():
		case <-time.After(3 * time.Second):
		}
	}
	v.Tail = g.con.Tail(20)
	return v
}

// Spans are the guest's per-stage durations so far.
func (g *Guest) Spans() []timeline.Span {
	return timeline.Spans(g.lab.Timeline.Events(g.Name), time.Now())
}

// Console is the guest's serial console so far, as in console.log: one line
// per console line, after its time since QEMU started.
func (g *Guest) Console() string {
	b, _ := os.ReadFile(filepath.Join(g.Dir, "console.log"))
	return string(b)
}

// Attach connects a terminal to the guest's serial console: the raw stream
// goes to w as it arrives (nil detaches), and Type sends keys.
func (g *Guest) Attach(w io.Writer) { g.con.Mirror(w) }

// Type sends keys to the guest's serial console.
func (g *Guest) Type(s string) error { return g.con.Send(s) }

// Process is the guest's QEMU.
func (g *Guest) Process() *qemu.Process { return g.proc }

// Spec is the guest's spec as Boot completed it: its name, MAC and address,
// marker, deadline and absolute paths filled in.
func (g *Guest) Spec() Spec {
	s := g.spec
	s.MAC, s.IP = g.MAC.String(), g.IP
	return s
}

// Argv is the QEMU command line the guest runs (nil before it started).
func (g *Guest) Argv() []string {
	if g.proc == nil {
		return nil
	}
	return append([]string(nil), g.proc.Args...)
}

// Verdict is the guest's verdict, once decided.
func (g *Guest) Verdict() (Verdict, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.verdict == nil {
		return Verdict{}, false
	}
	return *g.verdict, true
}

// Close stops QEMU, flushes the console log and capture, writes
// timeline.jsonl, and removes the guest's private files. Concurrent calls
// all return once that is done.
func (g *Guest) Close() error {
	g.closeOnce.Do(func() { g.closeErr = g.close() })
	return g.closeErr
}

// closed reports whether Close has finished.
func (g *Guest) closed() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.isClosed
}

func (g *Guest) close() error {
	defer func() {
		g.mu.Lock()
		g.isClosed = true
		g.mu.Unlock()
	}()
	if g.proc != nil {
		g.proc.Stop()
	}
	if g.con != nil {
		select {
		case <-g.con.Done():
		case <-time.After(2 * time.Second):
		}
		g.con.Close()
	}
	if g.port != nil {
		g.port.Close()
	}
	if g.logFile != nil {
		g.logFile.Close()
	}
	var err error
	g.espSummary()
	// A guest that never booted has no folder; "" would mean the working directory.
	if g.Dir != "" {
		if f, ferr := os.Create(filepath.Join(g.Dir, "timeline.jsonl")); ferr == nil {
			err = timeline.WriteJSONL(f, g.lab.Timeline.Events(g.Name))
			f.Close()
		}
	}
	g.release()
	return err
}

// release gives back what the lab holds for the guest: its exports, SAs
// and fault rules, its LUN and root handles, and its private files. A guest
// booted again under its name provisions them anew.
func (g *Guest) release() {
	l := g.lab
	switch g.spec.Root {
	case RootNFS:
		l.nfs.Unexport(NFSExport, g.IP)
	case RootISCSI:
		if g.lun != nil {
			l.iscsi.Unexport(ISCSITarget, g.IP, g.lun)
		}
	}
	if g.espPeer != nil {
		l.esp.RemovePeer(g.espPeer)
	}
	l.Fabric.RemoveRules(g.Name)
	if g.lun != nil {
		g.lun.Close()
	}
	if g.rootFS != nil {
		g.rootFS.Close()
	}
	if g.private != "" {
		os.RemoveAll(g.private)
	}
}
