package harness

import (
	"context"
	"fmt"
	"io"
	"nbh.dev/nbh/harness/netfab"
	"net"
	"path/filepath"
	"strings"

	"nbh.dev/nbh/harness/timeline"
)

// Listen opens the lab's boot network to QEMUs the user starts: a unix
// socket at path (-netdev stream,addr.type=unix,addr.path=PATH; a QEMU with
// the lab's own command line is QEMUArgs). A QEMU whose MAC is a provisioned
// guest's is that guest. One the lab has never seen is provisioned on its
// first frame from template, with its MAC, a name from it (g-XXXXXX) and
// the loader files of every chain of the arch: DHCP answers it by what its
// firmware says it is (option 93, vendor and user class), as a boot server
// answers a new machine. template.Artifacts, if set, is the folder the
// guests' artifacts go under, one folder per guest.
func (l *Lab) Listen(ctx context.Context, path string, template Spec) (io.Closer, error) {
	return l.fabric.Listen(path, func(mac net.HardwareAddr) (string, string, netfab.Lease, error) {
		l.mu.Lock()
		g := l.guests[mac.String()]
		l.mu.Unlock()
		if g == nil {
			spec := template
			spec.MAC = mac.String()
			spec.Name = "g-" + strings.ReplaceAll(mac[3:].String(), ":", "")
			spec.IP = ""
			spec.AnyLoader = true
			if template.Artifacts != "" {
				spec.Artifacts = filepath.Join(template.Artifacts, spec.Name)
			}
			var err error
			if g, err = l.Provision(ctx, spec); err != nil {
				return "", "", netfab.Lease{}, fmt.Errorf("provisioning a new guest for %s: %w", mac, err)
			}
		}
		if g.proc != nil {
			return "", "", netfab.Lease{}, fmt.Errorf("%s is guest %s's, whose QEMU the lab runs", mac, g.Name)
		}
		return g.Name, filepath.Join(g.Dir, "network.pcapng"), g.lease(), nil
	})
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
