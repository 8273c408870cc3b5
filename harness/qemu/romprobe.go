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
	roms, ok := romProbes[key]
	if !ok {
		var err error
		if roms, err = probeROMs(Binary(arch), machine); err != nil {
			return "", err
		}
		romProbes[key] = roms
	}
	rom, ok := roms[n.Device]
	if !ok {
		return "", fmt.Errorf("qemu: %s (%s) did not show NIC %s in its device tree", Binary(arch), machine, n.Device)
	}
	return rom, nil
}

var (
	romMu     sync.Mutex
	romProbes = map[string]map[string]string{}
)

// qtreeDev and qtreeROM are lines of HMP's "info qtree": a device and its
// romfile property (indented below it).
var (
	qtreeDev = regexp.MustCompile(`^\s*dev: ([^,]+), id "nbh-probe-[^"]*"`)
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
	roms := map[string]string{}
	dev := ""
	for _, l := range strings.Split(string(out), "\n") {
		if m := qtreeDev.FindStringSubmatch(l); m != nil {
			dev = m[1]
			roms[dev] = ""
			continue
		}
		if m := qtreeROM.FindStringSubmatch(l); m != nil && dev != "" {
			roms[dev] = m[1]
			dev = ""
		}
	}
	return roms, nil
}
