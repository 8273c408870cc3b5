package qemu

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"
)

// StreamReconnect is the -netdev stream option with which the QEMU for
// guests of arch connects to a unix socket that is not there yet and again
// after it went away ("reconnect-ms=1000" from QEMU 9.2, "reconnect=1" from
// 8.0), or "" when it connects once only (QEMU 7.2: its stream netdev must
// find the socket when it starts, and stays cut off if the server goes).
// Decided by a probe of the binary, not by its version string: a QEMU that
// takes the option connects to a socket the probe listens on; one that
// does not refuses the parameter and exits. Asked once per process.
func StreamReconnect(arch string) string {
	reconnectMu.Lock()
	defer reconnectMu.Unlock()
	if v, ok := reconnects[arch]; ok {
		return v
	}
	v := ""
	for _, opt := range []string{"reconnect-ms=1000", "reconnect=1"} {
		if probeStreamOption(Binary(arch), opt) {
			v = opt
			break
		}
	}
	reconnects[arch] = v
	return v
}

var (
	reconnectMu sync.Mutex
	reconnects  = map[string]string{}
)

// probeStreamOption reports whether bin starts with a stream netdev that
// carries opt: it connects to the probe's socket (the option parsed), or
// exits (refused), within 10 s.
func probeStreamOption(bin, opt string) bool {
	dir, err := os.MkdirTemp("", "nbh-probe-")
	if err != nil {
		return false
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return false
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-M", "none", "-S", "-display", "none", "-nodefaults", "-no-user-config",
		"-netdev", "stream,id=p,server=off,addr.type=unix,addr.path="+sock+","+opt)
	if err := cmd.Start(); err != nil {
		return false
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	defer func() { cmd.Process.Kill(); <-exited }()
	accepted := make(chan bool, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Close()
		}
		accepted <- err == nil
	}()
	select {
	case ok := <-accepted:
		return ok
	case <-exited:
		return false
	case <-ctx.Done():
		return false
	}
}
