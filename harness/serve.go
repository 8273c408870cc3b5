package harness

import (
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"

	"nbh.dev/nbh/harness/netfab"

	"nbh.dev/nbh/harness/timeline"
)

// DefaultMaxNew is how many machines Listen provisions at once for MACs
// the lab has never seen, unless told otherwise.
const DefaultMaxNew = 32

// Listen opens the lab's boot network to QEMUs the user starts: a unix
// socket at path (-netdev stream,addr.type=unix,addr.path=PATH; a QEMU with
// the lab's own command line is QEMUArgs), its owner's only (mode 0600). A
// QEMU whose MAC is a provisioned guest's is that guest. One the lab has
// never seen is provisioned on its first frame from template, with its MAC,
// a name from it (g-XXXXXX) and the loader files of every chain of the
// arch: DHCP answers it by what its firmware says it is (option 93, vendor
// and user class), as a boot server answers a new machine. At most maxNew
// such machines are served at once (0: DefaultMaxNew); one more is refused
// and recorded, and one that leaves (its QEMU's connection ends) is closed
// and forgotten: its lease, root and served files are given back, and the
// MAC is a new machine if it comes again. A MAC no guest may have (a
// group address, all zeros, the boot server's) is refused by the fabric.
// template.Artifacts, if set, is the folder the guests' artifacts go under,
// one folder per guest.
func (l *Lab) Listen(ctx context.Context, path string, template Spec, maxNew int) (io.Closer, error) {
	if maxNew <= 0 {
		maxNew = DefaultMaxNew
	}
	var mu sync.Mutex
	learned := map[string]*Guest{} // the machines provisioned here, by MAC
	provisioning := 0              // and those being provisioned
	learn := func(mac net.HardwareAddr) (string, string, netfab.Lease, error) {
		l.mu.Lock()
		g := l.guests[mac.String()]
		l.mu.Unlock()
		if g == nil {
			mu.Lock()
			n := len(learned) + provisioning
			if n < maxNew {
				provisioning++
			}
			mu.Unlock()
			if n >= maxNew {
				return "", "", netfab.Lease{}, fmt.Errorf("%d machines the lab had never seen are served already (the bound; nbh serve --max-guests)", n)
			}
			spec := template
			spec.MAC = mac.String()
			spec.Name = "g-" + strings.ReplaceAll(mac[3:].String(), ":", "")
			spec.IP = ""
			spec.AnyLoader = true
			if template.Artifacts != "" {
				spec.Artifacts = filepath.Join(template.Artifacts, spec.Name)
			}
			var err error
			g, err = l.Provision(ctx, spec)
			mu.Lock()
			provisioning--
			if err == nil {
				learned[mac.String()] = g
			}
			mu.Unlock()
			if err != nil {
				return "", "", netfab.Lease{}, fmt.Errorf("provisioning a new guest for %s: %w", mac, err)
			}
		}
		if g.proc != nil {
			return "", "", netfab.Lease{}, fmt.Errorf("%s is guest %s's, whose QEMU the lab runs", mac, g.Name)
		}
		return g.Name, filepath.Join(g.Dir, "network.pcapng"), g.lease(), nil
	}
	left := func(mac net.HardwareAddr) {
		mu.Lock()
		g := learned[mac.String()]
		delete(learned, mac.String())
		mu.Unlock()
		if g == nil {
			return // a guest provisioned beforehand: its QEMU may come back
		}
		l.tl.Emit(timeline.Event{Source: "netfab", Kind: "left", Guest: g.Name, MAC: mac.String(),
			Msg: "its QEMU left: its lease, root and boot files are given back"})
		g.Close()
		if !l.opts.ForgetClosed {
			g.forget()
		}
	}
	return l.fabric.Listen(path, learn, left)
}

// initStarted marks, from the network, that the reference init runs: its
// own DHCP client asks for an address. A guest whose console the lab does
// not see (nbh serve) still shows the init stage.
func (l *Lab) initStarted(g *Guest) {
	if g.Reached() < timeline.Init {
		l.tl.Emit(timeline.Event{Source: "dhcp", Kind: "init-client", Guest: g.Name, Stage: timeline.Init,
			Msg: "the reference init asks for its address"})
	}
}
