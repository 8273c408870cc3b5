package harness

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

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
