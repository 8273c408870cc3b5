package harness

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"nbh.dev/nbh/fixtures"
	"nbh.dev/nbh/harness/bootcfg"
	"nbh.dev/nbh/harness/dhcp"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/judge"
	"nbh.dev/nbh/harness/netfab"
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/harness/timeline"
)

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
	chain, err := LookupChain(spec.Arch, spec.Firmware)
	if err != nil {
		return nil, fmt.Errorf("spec: %w", err)
	}
	if chain, err = chain.WithSecureBoot(spec.SecureBoot); err != nil {
		return nil, fmt.Errorf("spec: %w", err)
	}
	if len(spec.SecureBootCerts) > 0 && !chain.SecureBoot {
		return nil, fmt.Errorf("spec: db certificates (--db-cert) are for a boot with Secure Boot on (--secure-boot; %s)", strings.Join(SecureBootChains(), ", "))
	}
	if spec.UserNet {
		switch {
		case chain.UserNet == "":
			return nil, fmt.Errorf("spec: %s cannot boot on QEMU's user-mode network (only %s)", chain.Name(), strings.Join(UserNetChains(), ", "))
		case len(spec.Faults) > 0 || spec.Root != RootNone || spec.AnyLoader || l.esp != nil:
			return nil, fmt.Errorf("spec: a boot on QEMU's user-mode network has no faults, no root, no IPsec and one chain")
		}
	}
	if spec.TapNet != nil {
		switch {
		case spec.UserNet:
			return nil, fmt.Errorf("spec: a tap network or QEMU's user-mode network, not both")
		case len(spec.Faults) > 0 || spec.Root != RootNone || spec.AnyLoader || l.esp != nil || (spec.Family != "" && spec.Family != dhcp.V4):
			return nil, fmt.Errorf("spec: a boot on a tap network has no faults, no root, no IPsec, IPv4 only and one chain")
		case spec.TapNet.Ifname == "" || spec.TapNet.Netns == "" || strings.ContainsAny(spec.TapNet.Netns, "/ \x00"):
			return nil, fmt.Errorf("spec: tap network %+v: want a tap device and a network namespace's name", *spec.TapNet)
		}
	}
	var p plan
	for _, given := range spec.Faults {
		// Only the name counts: a Fault made by hand is looked up, and
		// one nbh does not know is an error.
		f, err := LookupFault(given.Name)
		if err != nil {
			return nil, fmt.Errorf("spec: %w", err)
		}
		if f.Applies != nil && !f.Applies(chain, spec.Root) {
			return nil, fmt.Errorf("fault %s does not apply to %s%s (it is: %s)", f.Name, chain.Name(), secureBootWords(chain), f.Help)
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
	if p.sign && !chain.Verifies && !chain.signsArchive() {
		why := ""
		if chain.Secure != nil && chain.Secure.Signs {
			why = " (its firmware verifies the signed image with --secure-boot)"
		}
		return nil, fmt.Errorf("signed boot: %s's loader cannot verify signatures%s; only %s can", chain.Name(), why, strings.Join(VerifyingChains(), ", "))
	}
	switch spec.Family {
	case "":
		spec.Family = dhcp.V4
	case dhcp.V4, dhcp.V6, dhcp.Dual:
	default:
		return nil, fmt.Errorf("ip %q: want 4, 6 or dual", spec.Family)
	}
	if spec.Family != dhcp.V4 {
		switch {
		case !chain.IPv6:
			why := ""
			if chain.NoIPv6 != "" {
				why = " (" + chain.NoIPv6 + ")"
			}
			return nil, fmt.Errorf("ip %s: %s cannot boot over IPv6%s; %s can", spec.Family, chain.Name(), why, strings.Join(IPv6Chains(), ", "))
		case l.esp != nil || spec.UserNet:
			return nil, fmt.Errorf("ip %s: IPv6 boots are on the lab's clear network only (no IPsec, no QEMU user network)", spec.Family)
		case spec.Root == RootSANBoot:
			return nil, fmt.Errorf("ip %s: no SAN boot over IPv6: iPXE writes only IPv4 addresses into the iBFT (its ibft.c, in Debian 12's build and upstream alike); --root nfs and iscsi boot over IPv6", spec.Family)
		}
	}
	if err := chain.Drives(spec.NIC, spec.BringsNICDriver()); err != nil {
		return nil, fmt.Errorf("spec: %w", err)
	}
	if err := checkUserRoot(spec); err != nil {
		return nil, err
	}
	if len(spec.ArchiveFromRoot) > 0 && (spec.Root != RootNFS || spec.RootDir == "" || spec.Initrd != "") {
		return nil, fmt.Errorf("archive from root: the reference archive carries files of your NFS root tree (--root nfs --root-dir), not with an archive of yours")
	}
	if (spec.RootDir != "" || spec.RootImage != "") && len(spec.ArchiveFromRoot) == 0 && (p.editConfig || p.swap) {
		return nil, fmt.Errorf("fault: stale-config, config-changed and archive-swap change a root file the reference archive carries; with your root it carries none unless you name some (--archive-files); a changed file of your root that your own archive holds shows as a stale-archive event")
	}
	if err := chain.CheckUserFiles(spec); err != nil {
		return nil, fmt.Errorf("spec: %w", err)
	}
	switch spec.Root {
	case RootNone, RootNFS, RootISCSI, RootSANBoot:
	default:
		return nil, fmt.Errorf("root %q: want none, %q, %q or %q", spec.Root, RootNFS, RootISCSI, RootSANBoot)
	}
	if spec.Root == RootSANBoot && l.esp != nil {
		return nil, fmt.Errorf("root %s: the loader reads the disk over iSCSI, which the IPsec network protects, and no loader can do ESP", spec.Root)
	}
	if !chain.Boots(spec.Root) {
		return nil, fmt.Errorf("root %s: %s's loader cannot SAN-boot; only %s can", spec.Root, chain.Name(), strings.Join(SANBootChains(), ", "))
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
	var steps []*regexp.Regexp
	for i, st := range spec.Steps {
		re, err := regexp.Compile(st)
		if err != nil {
			return nil, fmt.Errorf("expect step %d: %w", i+1, err)
		}
		steps = append(steps, re)
	}
	var fails []judge.FailOn
	for _, f := range spec.FailOn {
		re, err := regexp.Compile(f.Pattern)
		if err != nil {
			return nil, fmt.Errorf("fail-on %q: %w", f.Pattern, err)
		}
		if strings.TrimSpace(f.Reason) == "" {
			return nil, fmt.Errorf("fail-on %q: no reason", f.Pattern)
		}
		fails = append(fails, judge.FailOn{Pattern: re, Reason: failure.Reason(f.Reason)})
	}
	var config *bootcfg.Template
	if spec.LoaderConfig != "" {
		if chain.LoaderConfig == "" {
			return nil, fmt.Errorf("loader config: %s has no loader that reads one (%s); the kernel command line is --append", chain.Name(), noLoaderWhy(chain))
		}
		if config, err = bootcfg.ReadTemplate(spec.LoaderConfig); err != nil {
			return nil, err
		}
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
		if err := netfab.CheckGuestMAC(wantMAC, l.fabric.HostMAC); err != nil {
			return nil, fmt.Errorf("spec: %w", err)
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
		if spec.RootWritable && other.spec.RootWritable && !other.closed() &&
			other.spec.RootDir+other.spec.RootImage == spec.RootDir+spec.RootImage {
			// Two machines on one writable file system corrupt it.
			l.mu.Unlock()
			return nil, fmt.Errorf("root writable: guest %s already boots from %s%s; one guest at a time writes to a root of yours", other.Name, spec.RootDir, spec.RootImage)
		}
	}
	l.mu.Unlock()
	g := &Guest{
		Name: spec.Name, Profile: chain.Profile, chain: chain, lab: l, spec: spec, expect: expect, steps: steps, failOn: fails, config: config,
		MAC: mac, n: n,
	}
	g.newBoot(time.Time{}) // its events from here on are its next boot's
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
	l.tl.Name(g.MAC.String(), g.Name)
	l.tl.Name(g.IP, g.Name)
	l.dhcp.Ignore(g.MAC, p.dhcpSilent)
	l.dhcp.Family(g.MAC, spec.Family)
	if spec.Family != dhcp.V4 {
		ip6, err := l.dhcp.Lease6(g.MAC)
		if err != nil {
			return nil, err
		}
		g.IP6 = ip6.String()
		l.tl.Name(g.IP6, g.Name)
	}
	// Its name and MAC are its own from here on (its addresses set), before
	// any of its files is on the server: Lab.open refuses them to others
	// while it is being provisioned too, and a failure removes them.
	l.mu.Lock()
	l.provisioning[g.Name] = g
	l.mu.Unlock()
	defer func() {
		if err != nil {
			os.RemoveAll(filepath.Join(l.srv, g.Name))
			os.Remove(filepath.Join(l.srv, "pxelinux.cfg", "01-"+strings.ReplaceAll(g.MAC.String(), ":", "-")))
		}
		l.mu.Lock()
		delete(l.provisioning, g.Name)
		l.mu.Unlock()
	}()

	g.plan = p
	if p.slowLink {
		l.fabric.AddRule(netfab.Rule{Name: "slow-link", Guest: g.Name, Dir: netfab.ToGuest, Action: netfab.Limit, Rate: slowLinkRate})
	}
	if l.esp != nil {
		if g.espConf, err = g.espKeys(); err != nil {
			return nil, err
		}
		if p.espReplay {
			l.fabric.AddRule(netfab.Rule{Name: "esp-replay", Guest: g.Name, Dir: netfab.FromGuest, Proto: "esp", Action: netfab.Replay, Delay: 20 * time.Millisecond})
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
	g.unsub = append(g.unsub, l.tl.Subscribe(g.observe))
	if spec.OnEvent != nil {
		g.unsub = append(g.unsub, l.tl.Subscribe(func(e timeline.Event) {
			if e.Guest == g.Name || e.Guest == "" {
				spec.OnEvent(e)
			}
		}))
	}

	if g.Accel, err = qemu.Choose(spec.Arch, l.opts.Accel); err != nil {
		return nil, err
	}
	return g, nil
}

// secureBootWords names a boot's Secure Boot for messages, where the chain
// has it.
func secureBootWords(c Chain) string {
	switch {
	case c.Secure == nil:
		return ""
	case c.SecureBoot:
		return " with Secure Boot on"
	}
	return " with Secure Boot off"
}

// noLoaderWhy says why a chain has no loader configuration.
func noLoaderWhy(c Chain) string {
	if c.Load == qemu.LoadKernel {
		return "QEMU loads kernel and archive itself"
	}
	return "the firmware boots a Unified Kernel Image, no loader"
}
