package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/harness/timeline"
)

func serveCmd(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	lab := addLabFlags(fs, "the chain whose QEMU command line to print (default: seabios-ipxe for amd64, uboot for arm64); guests with other firmware are served too")
	appendArgs := fs.String("append", "", "extra kernel command line arguments")
	guests := fs.Int("guests", 1, "how many QEMU command lines to print (one MAC each)")
	netdevOnly := fs.Bool("netdev-only", false, "print only the -netdev/-device part, for a QEMU with firmware of your own")
	dir := fs.String("dir", "", "folder for the socket and the guests' artifacts (default: a new temporary folder, kept; made mode 0700)")
	maxGuests := fs.Int("max-guests", harness.DefaultMaxNew, "how many machines never seen before it serves at once (each gets a lease, a root and boot files; one that leaves gives them back)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: nbh serve [flags]

Runs the lab's boot network without a guest: DHCP, TFTP, HTTP, NFS with its
portmapper, iSCSI, the archive keeper, the ESP gateway (--ipsec required) and
any faults, on a fabric your own QEMU joins through a unix socket
(-netdev stream,addr.type=unix,addr.path=DIR/net.sock). It prints the QEMU
command line of each of --guests machines for the chosen chain (or only its
network part: --netdev-only); a machine it has never seen is served too, by
what its firmware says it is (DHCP option 93, vendor class), up to
--max-guests at once; such a machine that leaves (its QEMU ends) gives back
its lease, root and files. The socket is its owner's only (0600). Each guest's
stages show as they happen; its timeline.jsonl and network.pcapng go to
DIR/artifacts/GUEST. Where QEMU's stream netdev can reconnect (QEMU 8.0 and
later, found by a probe), the printed line carries the option, so QEMU may
start before nbh serve and outlive a restart of it with the same --dir (a
socket a killed nbh serve left there is replaced); QEMU 7.2 connects once
and never again: start it after nbh serve says it is ready. Ctrl-C stops
everything.

Flags:
`)
		fs.PrintDefaults()
	}
	if code, ok := parse(fs, args); !ok {
		return code
	}
	prof, opts, template, err := lab.resolve()
	if err == nil && prof.Firmware == qemu.Direct {
		err = fmt.Errorf("--firmware direct has no network boot to serve")
	}
	if err == nil && (*guests < 0 || *guests > 200) {
		err = fmt.Errorf("--guests: want 0 to 200")
	}
	if err == nil && (*maxGuests < 1 || *maxGuests > 200) {
		err = fmt.Errorf("--max-guests: want 1 to 200")
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh serve: %v\n", err)
		return exitUsage
	}
	opts.Log = os.Stderr
	// A long-lived lab: what a guest held goes back when it closes.
	opts.ForgetClosed = true
	template.Append = *appendArgs
	if *dir == "" {
		if *dir, err = os.MkdirTemp("", "nbh-serve-"); err != nil {
			fmt.Fprintf(os.Stderr, "nbh serve: %v\n", err)
			return exitSetup
		}
	} else if err := os.MkdirAll(*dir, 0o700); err != nil {
		fmt.Fprintf(os.Stderr, "nbh serve: %v\n", err)
		return exitSetup
	}
	if *dir, err = filepath.Abs(*dir); err != nil {
		fmt.Fprintf(os.Stderr, "nbh serve: %v\n", err)
		return exitSetup
	}
	sock := filepath.Join(*dir, "net.sock")
	artifacts := filepath.Join(*dir, "artifacts")

	start := time.Now()
	template.OnStage = liveStage(start, true)
	template.OnEvent = func(e timeline.Event) {
		if e.Source == "netfab" && (e.Kind == "joined" || e.Kind == "refused" || e.Kind == "left") {
			fmt.Fprintf(os.Stderr, "  [%7.2fs] %-9s %s %s: %s\n", time.Since(start).Seconds(), e.Guest, e.Kind, e.MAC, e.Msg)
		}
	}
	template.Artifacts = artifacts

	l, err := harness.New(opts)
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh serve: %v\n", err)
		return exitSetup
	}
	defer l.Close()
	var printed []*harness.Guest
	for i := 1; i <= *guests; i++ {
		spec := template
		spec.Name = fmt.Sprintf("g%d", i)
		spec.Artifacts = filepath.Join(artifacts, spec.Name)
		g, err := l.Provision(ctx, spec)
		if err != nil {
			fmt.Fprintf(os.Stderr, "nbh serve: %v\n", err)
			return exitSetup
		}
		printed = append(printed, g)
	}
	ln, err := l.Listen(ctx, sock, template, *maxGuests)
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh serve: %v\n", err)
		return exitSetup
	}
	defer ln.Close()

	fmt.Printf("nbh serve: %s, root %s, network %s; socket %s\n", prof.Name(), *lab.root, *lab.ipsec, sock)
	for _, g := range printed {
		if *netdevOnly {
			nic, _ := qemu.LookupNIC(g.Spec().NIC)
			dev := nic.Device + ",netdev=n0,mac=" + g.MAC.String()
			if rom := g.Spec().NICROM; rom != "" {
				dev += ",romfile=" + rom
			}
			// The pinned iPXE ROMs, where the NIC's ROM boots the guest.
			roms := ""
			if argv, err := g.QEMUArgs(sock); err == nil {
				if i := slices.Index(argv, "-L"); i >= 0 && i+1 < len(argv) {
					roms = " -L " + shellJoin(argv[i+1:i+2])
				}
			}
			fmt.Printf("%s (%s): -netdev %s -device %s%s\n", g.Name, g.IP, qemu.StreamNetdev(sock, qemu.StreamReconnect(prof.Arch)), dev, roms)
			continue
		}
		argv, err := g.QEMUArgs(sock)
		if err != nil {
			fmt.Fprintf(os.Stderr, "nbh serve: %v\n", err)
			return exitSetup
		}
		addrs := g.IP
		if g.IP6 != "" {
			addrs += ", " + g.IP6
		}
		fmt.Printf("%s (%s, %s):\n  %s\n", g.Name, g.MAC, addrs, shellJoin(argv))
	}
	if qemu.StreamReconnect(prof.Arch) != "" {
		fmt.Printf("nbh serve: ready: start QEMU now (its netdev reconnects: a QEMU started before nbh serve, or left running across a restart of it with the same --dir, joins when the socket is there); a MAC never seen gets a lease and boot files too; Ctrl-C stops\n")
	} else {
		fmt.Printf("nbh serve: ready: start QEMU now (this QEMU connects once: this nbh serve must stay up); a MAC never seen gets a lease and boot files too; Ctrl-C stops\n")
	}
	<-ctx.Done()
	fmt.Fprintf(os.Stderr, "\nnbh serve: stopping\n")
	ln.Close()
	guestsSeen := l.Guests()
	l.Close()
	for _, g := range guestsSeen {
		fmt.Printf("%s: reached %s; artifacts %s\n", g.Name, g.Reached(), g.Dir)
	}
	return exitOK
}

var plainArg = regexp.MustCompile(`^[A-Za-z0-9_./:=,@%+-]+$`)

// shellJoin is argv as a line a POSIX shell reads back the same.
func shellJoin(argv []string) string {
	q := make([]string, len(argv))
	for i, a := range argv {
		if plainArg.MatchString(a) {
			q[i] = a
		} else {
			q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
	}
	return strings.Join(q, " ")
}
