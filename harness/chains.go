package harness

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"nbh.dev/nbh/harness/qemu"
)

// Chains lists the boot chains to run, narrowed by $NBH_ARCH and
// $NBH_FIRMWARE (comma-separated lists), so CI can shard the matrix.
func Chains() []qemu.Profile {
	return SelectChains(os.Getenv("NBH_ARCH"), os.Getenv("NBH_FIRMWARE"))
}

// SelectChains lists the chains whose architecture is in arches and whose
// firmware is in fws (comma-separated; empty or "all": any).
func SelectChains(arches, fws string) []qemu.Profile {
	archSet, fwSet := list(arches), list(fws)
	var out []qemu.Profile
	for _, p := range qemu.Profiles {
		if (archSet == nil || archSet[p.Arch]) && (fwSet == nil || fwSet[p.Firmware]) {
			out = append(out, p)
		}
	}
	return out
}

func list(v string) map[string]bool {
	v = strings.TrimSpace(v)
	if v == "" || v == "all" {
		return nil
	}
	m := map[string]bool{}
	for _, s := range strings.Split(v, ",") {
		m[strings.TrimSpace(s)] = true
	}
	return m
}

// pidAlive reports whether a process exists.
func pidAlive(pid int) bool {
	return syscall.Kill(pid, 0) == nil || syscall.Kill(pid, 0) == syscall.EPERM
}

// sweepStale removes lab folders left by processes that died without
// cleaning up (a SIGKILL, a panic): their names carry the owner's PID.
func sweepStale() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "nbh-lab-*-*"))
	for _, d := range dirs {
		parts := strings.Split(filepath.Base(d), "-")
		if len(parts) < 4 {
			continue
		}
		pid, err := strconv.Atoi(parts[2])
		if err != nil || pid == os.Getpid() || pidAlive(pid) {
			continue
		}
		os.RemoveAll(d)
	}
}
