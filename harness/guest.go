package harness

import (
	"context"
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

	"nbh.dev/nbh/harness/bootcfg"
	"nbh.dev/nbh/harness/console"
	"nbh.dev/nbh/harness/dhcp"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/iscsi"
	"nbh.dev/nbh/harness/judge"
	"nbh.dev/nbh/harness/netfab"
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/harness/warm"
	"nbh.dev/nbh/internal/rules"
)

// Guest is a booted guest.
type Guest struct {
	Name    string
	MAC     net.HardwareAddr
	IP      string
	IP6     string       // its IPv6 address, on an IPv6 boot (Spec.Family 6 or dual)
	Profile qemu.Profile // the chain's QEMU side
	Accel   qemu.Accel
	Dir     string // artifacts folder
	Start   time.Time

	lab     *Lab
	chain   Chain
	spec    Spec
	plan    plan
	lun     *iscsi.LUN
	disk    string           // the LUN's image file
	san     *bootcfg.SANBoot // a SAN boot's disk, once its ESP is written
	chap    *iscsi.CHAP
	keeper  *keeper     // the reference archive; nil for another archive
	rootFS  *os.Root    // the guest's root tree on the host, for lookups (NFS)
	rootDir string      // where that tree is
	espAddr netip.Addr  // the address its SAs are for (an IPsec network)
	espConf []byte      // the ESP keys its archive carries
	espPeer *ipsec.Peer // its SAs in the lab's gateway
	expect  *regexp.Regexp
	steps   []*regexp.Regexp  // Spec.Steps
	failOn  []judge.FailOn    // Spec.FailOn
	config  *bootcfg.Template // Spec.LoaderConfig
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

	unsub []func() // its timeline subscriptions

	mu        sync.Mutex
	cur       *boot // the boot under way (or the last one)
	closeOnce sync.Once
	closeErr  error
	isClosed  bool

	talk talk // the conversation on its console (Expect, Run, ...)

	warm      string      // how its machine started, in a lab with warm starts (WarmStart)
	warmMaker *warm.Maker // its snapshot's making, until saved or given up
	saving    sync.Mutex  // held while its machine is saved (saveWarm)
	saveEnded bool        // under saving: Close has given the save up
	typed     atomic.Bool // Send typed on its console (a machine not to save)

	kept      []timeline.Event // its last boot's events, once the lab forgot them
	restartMu sync.Mutex       // one Reboot or Reset at a time
	settle    *time.Timer      // a reset's return to ending QEMU on the next one
}

// Boot starts a guest on the lab's network. The returned guest is running;
// call Wait for its verdict and Close (or Lab.Close) to end it.
func (l *Lab) Boot(ctx context.Context, spec Spec) (*Guest, error) {
	g, err := l.provision(ctx, spec)
	if err != nil {
		return nil, err
	}
	if err := g.start(ctx); err != nil {
		return nil, err
	}
	return g, nil
}

// start runs the provisioned guest's QEMU on a port of the fabric, with the
// console, the monitor of its lines and the stage deadlines. In a lab with
// warm starts (Options.Warm) the machine starts from its snapshot where
// there is one, and makes it where there is none.
func (g *Guest) start(ctx context.Context) error {
	l := g.lab
	var err error
	var netFile *os.File
	switch {
	case g.spec.TapNet != nil:
		// On another network: the lab's fabric has no port for it.
	case g.spec.UserNet:
		if err := g.userNetRoot(); err != nil {
			g.Close()
			return err
		}
	default:
		if netFile, err = g.plugIn(); err != nil {
			g.Close()
			return err
		}
	}
	if g.logFile, err = os.Create(filepath.Join(g.Dir, "console.log")); err != nil {
		g.Close()
		return err
	}
	fmt.Fprintf(l.log, "lab: %s: %s, acceleration %s (%s)\n", g.Name, g.Profile.Name(), g.Accel.Name, g.Accel.Why)
	w := g.warmPlan(ctx)
	if w.snap != nil {
		if err = g.launch(netFile, w); err == nil {
			return g.started(w)
		}
		// Whatever went wrong, the guest boots: from reset, on a port and
		// a console log of its own.
		why := err.Error()
		if errors.Is(err, qemu.ErrRestore) {
			l.opts.Warm.Broken(w.snap, why)
		}
		w = warmStart{how: "cold: its snapshot did not restore (" + why + ")"}
		if netFile, err = g.plugIn(); err != nil {
			g.Close()
			return err
		}
		if err = truncate(g.logFile); err != nil {
			g.Close()
			return err
		}
	}
	if err = g.launch(netFile, w); err != nil {
		if w.maker != nil {
			w.maker.Abandon("its QEMU did not start: " + err.Error())
		}
		g.Close()
		return err
	}
	return g.started(w)
}

// plugIn gives the guest a port on the fabric (again, after a machine
// that did not restore: its QEMU took the old one's socket with it), and
// returns the socket end its QEMU inherits.
func (g *Guest) plugIn() (*os.File, error) {
	if g.port != nil {
		g.port.Close()
	}
	var err error
	if g.port, err = g.lab.fabric.AddPort(g.Name, g.MAC, filepath.Join(g.Dir, "network.pcapng")); err != nil {
		return nil, err
	}
	g.port.SetLease(g.lease()) // it speaks from its lease only
	return g.port.QEMUFile(), nil
}

func truncate(f *os.File) error {
	if err := f.Truncate(0); err != nil {
		return err
	}
	_, err := f.Seek(0, 0)
	return err
}

// launch runs the guest's QEMU with its console: from reset, or from w's
// snapshot, loaded and paused there (started runs it on). Nothing is left
// running, and nothing writes the console log, when it fails.
func (g *Guest) launch(netFile *os.File, w warmStart) error {
	g.Start = time.Now()
	con, err := console.New(g.logFile, g.Start)
	if err != nil {
		return err
	}
	if w.maker != nil {
		con.KeepRaw()
	}
	c := g.qemuConfig("")
	if w.snap != nil {
		c.Incoming = w.snap.State
	}
	if w.maker != nil {
		// The port holds the guest's frames from the first on; at the
		// first that asks for something the machine is saved (saveWarm).
		g.port.HoldUntilAsked(func() { g.saveWarm(w) })
	}
	proc, err := qemu.Start(c, con.Tty(), netFile)
	if netFile != nil {
		netFile.Close()
	}
	if err != nil {
		con.Tty().Close()
		con.Close()
		return err
	}
	if w.snap == nil {
		con.Started()
	} else {
		con.StartedAfter(w.snap.Console)
		if err := proc.WaitIncoming(restoreTimeout); err != nil {
			proc.Stop()
			// Its reader must be done before the log is the next
			// start's: it may hold replayed lines nobody reads.
			go func() {
				for range con.Lines() {
				}
			}()
			select {
			case <-con.Done():
			case <-time.After(5 * time.Second):
			}
			con.Close()
			return err
		}
	}
	g.mu.Lock()
	g.con, g.proc = con, proc
	g.mu.Unlock()
	return nil
}

// started follows the launched guest: the start on the timeline, the
// monitor of its console, its stage deadlines; a restored machine then
// gets the frames it sent before its save, and runs on.
func (g *Guest) started(w warmStart) error {
	l := g.lab
	b := g.current()
	b.j.Begin(g.Start)
	g.mu.Lock()
	g.warm, g.warmMaker = w.how, w.maker
	g.mu.Unlock()
	l.tl.Emit(timeline.Event{Source: "qemu", Kind: "start", Guest: g.Name, Stage: timeline.Firmware, Time: g.Start,
		Msg: g.Profile.Name(), Detail: map[string]any{"argv": strings.Join(g.proc.Args, " "), "accel": g.Accel.Name, "pid": g.proc.Pid()}})
	if w.how != "" {
		ev := timeline.Event{Source: "qemu", Kind: "warm", Guest: g.Name, Msg: w.how}
		if w.snap != nil {
			ev.Detail = map[string]any{"key": w.key, "firmware_seconds": w.snap.Firmware.Seconds(), "frames": len(w.snap.Frames), "made": w.snap.Made}
		}
		l.tl.Emit(ev)
		fmt.Fprintf(l.log, "lab: %s: %s\n", g.Name, w.how)
	}
	go g.monitor()
	go b.j.Watch(b.ctx)
	if w.snap != nil {
		// Switched while the machine is still paused (QEMU queues the
		// answers), so nothing it sends next comes before them.
		g.port.Inject(w.snap.Frames)
		if err := g.proc.Cont(); err != nil {
			g.decide(Verdict{Reason: failure.QEMUFailed, Stage: timeline.Firmware, Detail: "the restored machine did not run on: " + err.Error()})
		}
	}
	return nil
}

// passes says a console line that looks like a failure is none in this
// boot (Chain.Passes6).
func (g *Guest) passes(line string) bool {
	return g.spec.Family == dhcp.V6 && g.chain.Passes6 != nil && g.chain.Passes6.MatchString(line)
}

// userNetRoot makes the folder QEMU's own TFTP server serves a guest on
// its user-mode network: links to what the lab serves it — the shared
// loader files (the regular files at the top of the served root), its own
// folder, its own pxelinux config and U-Boot script — and nothing else:
// QEMU's TFTP serves all of its root to whoever asks, so the lab's
// ownership rule cannot apply there, and a folder at the top is a guest's.
func (g *Guest) userNetRoot() error {
	l := g.lab
	root := filepath.Join(g.private, "tftp")
	if err := os.MkdirAll(filepath.Join(root, "pxelinux.cfg"), 0o755); err != nil {
		return err
	}
	ents, err := os.ReadDir(l.srv)
	if err != nil {
		return err
	}
	link := func(from, to string) error {
		if _, err := os.Stat(from); err != nil {
			return nil // nothing to serve by that name
		}
		return os.Symlink(from, filepath.Join(root, to))
	}
	for _, e := range ents {
		switch name := e.Name(); {
		case name == g.Name:
			err = link(filepath.Join(l.srv, name), name)
		case e.IsDir() && rules.On(rules.OwnBootScript):
			// another guest's folder, or pxelinux.cfg (below)
		case name == ubootScriptName && fileExists(filepath.Join(l.srv, g.Name, ubootScriptName)) && rules.On(rules.OwnBootScript):
			err = link(filepath.Join(l.srv, g.Name, ubootScriptName), name)
		case e.Type().IsRegular() || !rules.On(rules.OwnBootScript):
			err = link(filepath.Join(l.srv, name), name)
		}
		if err != nil {
			return fmt.Errorf("lab: user-mode network TFTP root: %w", err)
		}
	}
	own := "01-" + strings.ReplaceAll(g.MAC.String(), ":", "-")
	return link(filepath.Join(l.srv, "pxelinux.cfg", own), filepath.Join("pxelinux.cfg", own))
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// addrs is the guest's leased addresses, IPv4 first: its exports are
// keyed by them.
func (g *Guest) addrs() []string {
	if g.IP6 == "" {
		return []string{g.IP}
	}
	return []string{g.IP, g.IP6}
}

// lease is the addresses the guest's port lets it speak from.
func (g *Guest) lease() netfab.Lease {
	var l netfab.Lease
	l.IP, _ = netip.ParseAddr(g.IP)
	l.IP6, _ = netip.ParseAddr(g.IP6)
	return l
}

// qemuConfig is how QEMU runs the guest: on an inherited socket (socket
// ""), or joining the lab through the unix socket at socket.
func (g *Guest) qemuConfig(socket string) qemu.Config {
	c := qemu.Config{
		Profile: g.Profile, Accel: g.Accel, Memory: g.spec.Memory, MAC: g.MAC.String(), NIC: g.spec.NIC, ROMFile: g.spec.NICROM, Files: g.files,
		Kernel: g.kernel, Initrd: g.initrd, Append: g.cmdline(),
		Dir: g.private, QMP: filepath.Join(g.private, "qmp.sock"), NetSocket: socket,
	}
	if socket != "" {
		c.NetReconnect = qemu.StreamReconnect(g.Profile.Arch)
	}
	c.Profile.FwCfg = g.chain.fwCfg(g.Profile.FwCfg, g.spec.Family)
	c.TapNet = g.spec.TapNet
	if g.spec.UserNet {
		c.UserNet = &qemu.UserNet{TFTPRoot: filepath.Join(g.private, "tftp"), Bootfile: strings.ReplaceAll(g.chain.UserNet, "{guest}", g.Name)}
	}
	return c
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

// Events are the current boot's events on the lab timeline so far (all of
// the guest's boots: Lab.Timeline.Events with its name).
func (g *Guest) Events() []timeline.Event {
	g.mu.Lock()
	kept := g.kept
	g.mu.Unlock()
	if kept != nil {
		return kept // closed in a lab that forgets (Options.ForgetClosed)
	}
	return g.lab.tl.BootEvents(g.Name, g.Boot())
}

// Spans are the current boot's per-stage durations so far.
func (g *Guest) Spans() []timeline.Span {
	return timeline.Spans(g.Events(), time.Now())
}

// Console is the guest's serial console so far, as in console.log: one line
// per console line, after its time since QEMU started.
func (g *Guest) Console() string {
	b, _ := os.ReadFile(filepath.Join(g.Dir, "console.log"))
	return string(b)
}

// Attach connects a terminal to the guest's serial console: the raw stream
// goes to w as it arrives (nil detaches), and Send types keys. It fails on
// a guest that never started.
func (g *Guest) Attach(w io.Writer) error {
	if g.con == nil {
		return errNotStarted
	}
	g.con.Mirror(w)
	return nil
}

// Process is the guest's QEMU.
func (g *Guest) Process() *qemu.Process { return g.proc }

// Argv is the QEMU command line the guest runs (nil before it started).
func (g *Guest) Argv() []string {
	if g.proc == nil {
		return nil
	}
	return append([]string(nil), g.proc.Args...)
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
	g.endSave()
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
	if b := g.current(); b != nil {
		b.stopDrift() // before the root it reads is released
	}
	var err error
	g.espSummary()
	// A guest that never booted has no folder; "" would mean the working directory.
	if g.Dir != "" {
		if f, ferr := os.Create(filepath.Join(g.Dir, "timeline.jsonl")); ferr == nil {
			err = timeline.WriteJSONL(f, g.lab.tl.Events(g.Name))
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
	if b := g.current(); b != nil {
		b.stopDrift()
	}
	switch g.spec.Root {
	case RootNFS:
		for _, ip := range g.addrs() {
			l.nfs.Unexport(NFSExport, ip)
		}
	case RootISCSI, RootSANBoot:
		for _, ip := range g.addrs() {
			if g.lun != nil {
				l.iscsi.Unexport(ISCSITarget, ip, g.lun)
			}
		}
	}
	// The guest is gone and never closes its connections: cut them, or
	// each holds a server goroutine and its buffers for the lab's life.
	for _, ip := range g.addrs() {
		if ip != "" {
			l.nfs.Disconnect(ip)
			l.portmap.Disconnect(ip)
			l.iscsi.Disconnect(ip)
		}
	}
	if g.espPeer != nil {
		l.esp.RemovePeer(g.espPeer)
	}
	l.fabric.RemoveRules(g.Name)
	for _, u := range g.unsub {
		u()
	}
	if g.lun != nil {
		g.lun.Close()
	}
	if g.rootFS != nil {
		g.rootFS.Close()
	}
	if g.private != "" {
		os.RemoveAll(g.private)
	}
	if l.opts.ForgetClosed {
		g.forget()
	}
}

// forget removes what the lab keeps of a closed guest beyond its Close
// (Options.ForgetClosed): its place in the lab's tables, its lease, its
// events, its root, its served files and the artifacts the lab made.
func (g *Guest) forget() {
	l := g.lab
	l.mu.Lock()
	if l.guests[g.MAC.String()] == g {
		delete(l.guests, g.MAC.String())
	}
	if l.byName[g.Name] == g {
		delete(l.byName, g.Name)
	}
	l.mu.Unlock()
	l.dhcp.Release(g.MAC)
	kept := g.Events() // its last boot's, for its verdict's bundle and report
	g.mu.Lock()
	g.kept = kept
	g.mu.Unlock()
	l.tl.Forget(g.Name, g.MAC.String(), g.IP, g.IP6)
	base := filepath.Join(l.work, "roots", g.Name)
	for _, p := range []string{base, base + ".img", base + ".disk", base + ".tmp", filepath.Join(l.srv, g.Name)} {
		os.RemoveAll(p)
	}
	if g.spec.Artifacts == "" && g.Dir != "" {
		os.RemoveAll(g.Dir)
	}
}
