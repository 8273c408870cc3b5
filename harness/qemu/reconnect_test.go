package qemu

import (
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"
)

// TestStreamReconnect holds the probe to what the option is for, on this
// host's QEMU: when it names an option, a QEMU started with it before the
// socket exists joins once the socket is there; when it names none, this
// QEMU refuses both spellings of the option.
func TestStreamReconnect(t *testing.T) {
	bin := Binary("amd64")
	if _, err := exec.LookPath(bin); err != nil {
		t.Skipf("%s not installed", bin)
	}
	opt := StreamReconnect("amd64")
	t.Logf("%s: %q", Version("amd64"), opt)
	sock := filepath.Join(t.TempDir(), "late.sock")
	if opt == "" {
		for _, o := range []string{"reconnect-ms=1000", "reconnect=1"} {
			out, err := exec.Command(bin, "-M", "none", "-S", "-display", "none", "-nodefaults",
				"-netdev", StreamNetdev(sock, o)).CombinedOutput()
			assert.Assert(t, err != nil, "QEMU took %s, yet the probe found no reconnect option", o)
			assert.Assert(t, strings.Contains(string(out), "nvalid parameter") || strings.Contains(string(out), "unexpected"), "%s: %s", o, out)
		}
		return
	}
	q := exec.Command(bin, "-M", "none", "-S", "-display", "none", "-nodefaults", "-netdev", StreamNetdev(sock, opt))
	assert.NilError(t, q.Start())
	exited := make(chan error, 1)
	go func() { exited <- q.Wait() }()
	defer func() { q.Process.Kill(); <-exited }()
	// The socket appears only once QEMU is up.
	select {
	case err := <-exited:
		t.Fatalf("QEMU with %s and no socket yet exited: %v", opt, err)
	case <-time.After(1500 * time.Millisecond):
	}
	ln, err := net.Listen("unix", sock)
	assert.NilError(t, err)
	defer ln.Close()
	got := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Close()
		}
		got <- err
	}()
	select {
	case err := <-got:
		assert.NilError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatalf("QEMU with %s did not join the socket that appeared after it started", opt)
	}
}
