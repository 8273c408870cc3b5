package qemu

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"time"
)

// DefaultROM is the option ROM file the QEMU for arch loads by default for
// the NIC on machine ("" for none), asked of QEMU itself: which file a
// model gets changed between versions (QEMU 10 gives ne2k_pci an EFI ROM;
// compatibility properties keep older names in the binary), so neither a
// table nor the binary's strings can say. The probe creates every model
// on a stopped machine and reads their romfile property back from the
// monitor's device tree; once per QEMU binary and machine.
func DefaultROM(arch, machine string, n NIC) (string, error) {
	romMu.Lock()
	defer romMu.Unlock()
	key := arch + "/" + machine
	p, ok := romProbes[key]
	if !ok {
		// A failed probe is remembered too: asked again, it would fail
		// again, slowly.
		p.roms, p.err = probeROMs(Binary(arch), machine)
		romProbes[key] = p
	}
	if p.err != nil {
		return "", p.err
	}
	rom, ok := p.roms[n.Device]
	if !ok {
		return "", fmt.Errorf("qemu: %s (%s) did not show NIC %s in its device tree", Binary(arch), machine, n.Device)
	}
	return rom, nil
}

var (
	romMu     sync.Mutex
	romProbes = map[string]romProbe{}
)

type romProbe struct {
	roms map[string]string
	err  error
}

// qtreeDev and qtreeROM are lines of HMP's "info qtree": a device (with
// the probe's id for one of nics) and its romfile property (indented below
// it, before the device's child buses).
var (
	qtreeDev = regexp.MustCompile(`^\s*dev: [^,]+, id "([^"]*)"`)
	qtreeROM = regexp.MustCompile(`^\s*romfile = "([^"]*)"`)
)

func probeROMs(bin, machine string) (map[string]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	args := []string{"-M", machine, "-S", "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "stdio"}
	for i, n := range nics {
		args = append(args, "-device", fmt.Sprintf("%s,id=nbh-probe-%d", n.Device, i))
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdin = strings.NewReader("info qtree\nquit\n")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("qemu: probing the NICs' option ROMs (%s -M %s): %v: %s", bin, machine, err, bytes.TrimSpace(out))
	}
	return parseQtree(string(out)), nil
}

// parseQtree maps each probed NIC's device name to the romfile the tree
// shows for it: the first romfile line after the device's own line and
// before the next device's (a child's or sibling's is never taken for it).
func parseQtree(out string) map[string]string {
	roms := map[string]string{}
	dev := ""
	for _, l := range strings.Split(out, "\n") {
		if m := qtreeDev.FindStringSubmatch(l); m != nil {
			dev = ""
			var i int
			if _, err := fmt.Sscanf(m[1], "nbh-probe-%d", &i); err == nil && i >= 0 && i < len(nics) && m[1] == fmt.Sprintf("nbh-probe-%d", i) {
				dev = nics[i].Device
				roms[dev] = ""
			}
			continue
		}
		if m := qtreeROM.FindStringSubmatch(l); m != nil && dev != "" {
			roms[dev] = m[1]
			dev = ""
		}
	}
	return roms
}
