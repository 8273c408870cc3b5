package scenarios

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/images"
)

// realLab is the boot network a team runs instead of nbh's: a Linux bridge
// with a tap device for the guest, dnsmasq for DHCP and TFTP, and a stock
// HTTP server from Debian (busybox's httpd, the image cache's pinned
// busybox-static), in a network namespace of its own. They serve the
// folder the lab provisioned (Lab.ServedDir): the same kernel, archive and
// loader configuration, by the same names and at the same address
// (10.0.2.2) as the lab's own servers.
type realLab struct {
	ns    string
	tap   *qemu.TapNet
	procs []*exec.Cmd
	log   string
}

// realLabKernel is the line the real lab's log shows when it served the
// chain's kernel: httpd's (-vv) request line, or dnsmasq's TFTP transfer.
var realLabKernel = map[string]string{
	"amd64/seabios-ipxe": "url:/g1/vmlinuz",
	"amd64/ovmf-pxe":     "url:/g1/vmlinuz",
	"amd64/ovmf-http":    "url:/g1/boot.efi",
	"arm64/uboot":        "/g1/vmlinuz to 10.0.2.15",
}

// realLabChains are the chains the baseline boots, with the dnsmasq rules
// that answer their firmware and loaders as the lab's DHCP rules do.
var realLabChains = map[string][]string{
	"amd64/seabios-ipxe": {"--dhcp-userclass=set:ipxe,iPXE", "--dhcp-boot=tag:ipxe,http://10.0.2.2/g1/boot.ipxe"},
	"amd64/ovmf-pxe": {"--dhcp-userclass=set:ipxe,iPXE", "--dhcp-boot=tag:ipxe,http://10.0.2.2/g1/boot.ipxe",
		"--dhcp-match=set:efi64,option:client-arch,7", "--dhcp-boot=tag:efi64,tag:!ipxe,ipxe.efi"},
	"amd64/ovmf-http": {"--dhcp-match=set:http,option:client-arch,16", "--dhcp-boot=tag:http,http://10.0.2.2/g1/boot.efi",
		"--dhcp-option-force=tag:http,60,HTTPClient"},
	"arm64/uboot": {"--dhcp-vendorclass=set:uboot,U-Boot", "--dhcp-boot=tag:uboot,boot.scr.uimg"},
}

// realLabMissing says why this machine cannot run the baseline, "" if it
// can.
func realLabMissing() string {
	if os.Geteuid() != 0 {
		return "the dnsmasq baseline needs root (a network namespace, a bridge, a tap device)"
	}
	for tool, pkg := range map[string]string{"ip": "iproute2", "dnsmasq": "dnsmasq-base"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Sprintf("the dnsmasq baseline needs %s (apt-get install %s)", tool, pkg)
		}
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		return "the dnsmasq baseline needs /dev/net/tun"
	}
	return ""
}

// startRealLab makes the namespace, bridge and tap device and starts
// dnsmasq and httpd serving lab's folder for chain; stop undoes it all.
func startRealLab(tb testing.TB, lab *harness.Lab, chain string) (*realLab, error) {
	rules, ok := realLabChains[chain]
	if !ok {
		return nil, fmt.Errorf("no dnsmasq rules for %s", chain)
	}
	r := &realLab{ns: fmt.Sprintf("nbh-real-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6), tap: &qemu.TapNet{Ifname: "tap0"}}
	r.tap.Netns = r.ns
	r.log = filepath.Join(tb.TempDir(), "reallab.log")
	ip := func(args ...string) error {
		if out, err := exec.Command("ip", append([]string{"-n", r.ns}, args...)...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	if out, err := exec.Command("ip", "netns", "add", r.ns).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add: %v: %s", err, out)
	}
	tb.Cleanup(r.stop) // whatever fails later (stop may run twice)
	for _, c := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", "br0", "type", "bridge"},
		{"addr", "add", "10.0.2.2/24", "dev", "br0"},
		// IPv6 router advertisements, as the lab sends: iPXE waits for
		// one (up to 15 s) before it calls its network configured.
		{"addr", "add", "fd4e:4248::2/64", "dev", "br0", "nodad"},
		{"link", "set", "br0", "up"},
		{"tuntap", "add", "dev", "tap0", "mode", "tap"},
		{"link", "set", "tap0", "master", "br0"},
		{"link", "set", "tap0", "up"},
	} {
		if err := ip(c...); err != nil {
			r.stop()
			return nil, err
		}
	}
	busybox, err := lab.Cache().Path(context.Background(), "amd64", images.Busybox())
	if err != nil {
		r.stop()
		return nil, err
	}
	srv := lab.ServedDir()
	dnsmasq := append([]string{"dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
		"--port=0", "--user=root", "--pid-file=", "--log-facility=" + r.log + ".dnsmasq",
		"--interface=br0", "--bind-interfaces", "--dhcp-authoritative",
		"--dhcp-range=10.0.2.15,10.0.2.15,255.255.255.0,1h", "--enable-ra", "--dhcp-range=::,constructor:br0,ra-only", "--dhcp-leasefile=" + filepath.Join(filepath.Dir(r.log), "leases"),
		"--enable-tftp", "--tftp-root=" + srv}, rules...)
	for _, argv := range [][]string{dnsmasq, {busybox, "httpd", "-f", "-vv", "-p", "10.0.2.2:80", "-h", srv}} {
		cmd := exec.Command("ip", append([]string{"netns", "exec", r.ns}, argv...)...)
		f, err := os.OpenFile(r.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			r.stop()
			return nil, err
		}
		cmd.Stdout, cmd.Stderr = f, f
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		err = cmd.Start()
		f.Close()
		if err != nil {
			r.stop()
			return nil, fmt.Errorf("%s: %w", argv[0], err)
		}
		r.procs = append(r.procs, cmd)
	}
	return r, nil
}

// stop ends dnsmasq and httpd and removes the namespace (and with it the
// bridge and the tap device).
func (r *realLab) stop() {
	for _, c := range r.procs {
		syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
		c.Wait()
	}
	r.procs = nil
	exec.Command("ip", "netns", "del", r.ns).Run()
}

// logs is what dnsmasq and httpd printed, for a failed boot.
func (r *realLab) logs() string {
	var b strings.Builder
	for _, f := range []string{r.log, r.log + ".dnsmasq"} {
		if data, err := os.ReadFile(f); err == nil {
			b.Write(data)
		}
	}
	return b.String()
}

// TestRealLabBaseline: each chain the benchmark measures against the
// dnsmasq network reaches the marker on it, served by it: dnsmasq's log
// shows the lease it gave, and the real lab's servers' the kernel they
// sent (so the benchmark measures that network, not nbh's). Skipped, with
// the reason, where it cannot run (not root, no dnsmasq).
func TestRealLabBaseline(t *testing.T) {
	needGuests(t)
	if why := realLabMissing(); why != "" {
		t.Skip(why)
	}
	names := make([]string, 0, len(realLabChains))
	for n := range realLabChains {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		arch, firmware, _ := strings.Cut(name, "/")
		t.Run(name, func(t *testing.T) {
			guestTest(t)
			if !selected(arch, firmware) {
				t.Skipf("chain %s not selected by NBH_ARCH/NBH_FIRMWARE", name)
			}
			v, rl := bootOnRealLab(t, arch, firmware)
			defer rl.stop()
			if !v.OK {
				t.Fatalf("%v\nthe real lab's log:\n%s", v.Err(), rl.logs())
			}
			for _, want := range []string{"DHCPACK(br0) 10.0.2.15", realLabKernel[name]} {
				if !strings.Contains(rl.logs(), want) {
					t.Fatalf("the real lab's log has no %q:\n%s", want, rl.logs())
				}
			}
		})
	}
}

// bootOnRealLab provisions the chain's boot files in a lab of its own and
// boots the guest on the dnsmasq network serving them; the caller stops
// the network.
func bootOnRealLab(tb testing.TB, arch, firmware string) (harness.Verdict, *realLab) {
	lab := nbhtest.NewLab(tb)
	rl, err := startRealLab(tb, lab, arch+"/"+firmware)
	if err != nil {
		tb.Fatal(err)
	}
	g, err := lab.Boot(context.Background(), harness.Spec{Arch: arch, Firmware: firmware, TapNet: rl.tap})
	if err != nil {
		rl.stop()
		tb.Fatal(err)
	}
	return g.Wait(context.Background()), rl
}
