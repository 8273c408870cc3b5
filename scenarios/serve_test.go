package scenarios

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"gotest.tools/v3/assert"
	is "gotest.tools/v3/assert/cmp"
	"gotest.tools/v3/poll"

	"nbh.dev/nbh/harness/qemu"
)

// syncBuffer is a buffer two goroutines share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// waitMarker waits for the reference marker on the console of a QEMU the
// test started.
func waitMarker(t *testing.T, console *syncBuffer) {
	t.Helper()
	poll.WaitOn(t, func(poll.LogT) poll.Result {
		if strings.Contains(console.String(), "NBH-READY") {
			return poll.Success()
		}
		return poll.Continue("no marker yet")
	}, poll.WithTimeout(240*time.Second), poll.WithDelay(time.Second))
}

// shellSplit reads back a line nbh printed with shellJoin.
func shellSplit(line string) []string {
	var out []string
	for _, m := range regexp.MustCompile(`'((?:[^']|'\\'')*)'|(\S+)`).FindAllStringSubmatch(line, -1) {
		if m[2] != "" {
			out = append(out, m[2])
		} else {
			out = append(out, strings.ReplaceAll(m[1], `'\''`, "'"))
		}
	}
	return out
}

// TestServeWithOwnQEMU is nbh serve as a user runs it: serve first, then a
// QEMU started from the command line it printed — or with a MAC it has
// never seen — reaches the marker over the lab's network; the stages show
// on serve's output as they happen; Ctrl-C leaves no process or socket.
func TestServeWithOwnQEMU(t *testing.T) {
	needGuests(t)
	t.Parallel()
	bin := buildNBH(t)
	for _, c := range []struct {
		name, arch, firmware, mac, guest string
		args                             []string
		nic                              string // the user's QEMU's NIC, in place of virtio
	}{
		{"arm64/uboot", "arm64", "uboot", "", "g1", nil, ""},
		// A QEMU that joins through the socket gets its IPv6 lease bound
		// to its port as a guest the lab runs does (else iPXE's HTTP from
		// it would be dropped as spoofed).
		{"amd64/seabios-ipxe-ip6", "amd64", "seabios-ipxe", "", "g1", []string{"--ip", "6"}, ""},
		// A machine serve never printed a line for: a lease and boot
		// files by what its firmware says it is.
		{"amd64/never-seen-mac", "amd64", "seabios-ipxe", "52:54:00:aa:bb:cc", "g-aabbcc", nil, ""},
		// The user's QEMU with an e1000: its iPXE ROM boots, and the
		// reference archive carries the card's driver.
		{"amd64/e1000", "amd64", "seabios-ipxe", "52:54:00:aa:bb:cd", "g-aabbcd", nil, "e1000"},
		// RISC-V: OpenSBI and U-Boot as -bios/-kernel on the printed
		// line, and a machine never seen served by the same rule.
		{"riscv64/never-seen-mac", "riscv64", "uboot", "52:54:00:aa:bb:ce", "g-aabbce", nil, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			guestTest(t)
			if !selected(c.arch, c.firmware) {
				t.Skipf("%s/%s not selected", c.arch, c.firmware)
			}
			tmp := t.TempDir()
			dir := filepath.Join(t.TempDir(), "serve")
			serve := exec.Command(bin, append([]string{"serve", "--arch", c.arch, "--firmware", c.firmware, "--dir", dir}, c.args...)...)
			serve.Env = append(os.Environ(), "TMPDIR="+tmp)
			var serveErr syncBuffer
			serve.Stderr = &serveErr
			stdout, err := serve.StdoutPipe()
			assert.NilError(t, err)
			assert.NilError(t, serve.Start())
			defer serve.Process.Kill()
			var qemuLine string
			var serveOut strings.Builder
			sc := bufio.NewScanner(stdout)
			sc.Buffer(make([]byte, 64<<10), 1<<20)
			for sc.Scan() {
				serveOut.WriteString(sc.Text() + "\n")
				if l := strings.TrimSpace(sc.Text()); strings.HasPrefix(l, "qemu-system-") {
					qemuLine = l
				}
				if strings.HasPrefix(sc.Text(), "nbh serve: ready") {
					break
				}
			}
			assert.Assert(t, qemuLine != "", "serve printed no QEMU command:\n%s\n%s", serveOut.String(), serveErr.String())
			go func() {
				for sc.Scan() {
				}
			}()
			argv := shellSplit(qemuLine)
			if c.mac != "" {
				for i, a := range argv {
					argv[i] = regexp.MustCompile(`mac=[0-9a-f:]+`).ReplaceAllString(a, "mac="+c.mac)
				}
			}
			if c.nic != "" {
				for i, a := range argv {
					if strings.HasPrefix(a, "virtio-net-pci,") {
						// QEMU's own ROM for the card (the lab's line has none for virtio).
						argv[i] = strings.Replace(strings.Replace(a, "virtio-net-pci,", c.nic+",", 1), ",romfile=", "", 1)
					}
				}
			}
			assert.Assert(t, c.nic == "" || strings.Contains(strings.Join(argv, " "), " "+c.nic+",netdev="), "%v", argv)
			q := exec.Command(argv[0], argv[1:]...)
			var console syncBuffer
			q.Stdout, q.Stderr = &console, &console
			assert.NilError(t, q.Start())
			defer q.Process.Kill()
			waitMarker(t, &console)
			wantAddr := "nbh-init: NBH-READY addr=10.0.2."
			if slices.Contains(c.args, "6") {
				wantAddr = "nbh-init: NBH-READY addr=fd4e:4248::15/64"
			}
			assert.Check(t, is.Contains(console.String(), wantAddr))
			waitExit(t, q) // the init powers the machine off

			for _, stage := range []string{"dhcp", "loader", "init"} {
				assert.Check(t, is.Regexp(`\] `+c.guest+`\s+`+stage+` `, serveErr.String()), "serve did not show stage %s", stage)
			}
			if c.mac != "" {
				// A machine serve never saw gives back what it got when
				// its QEMU ends.
				poll.WaitOn(t, func(poll.LogT) poll.Result {
					if regexp.MustCompile(`\] ` + c.guest + `\s+left `).MatchString(serveErr.String()) {
						return poll.Success()
					}
					return poll.Continue("serve did not say %s left", c.guest)
				}, poll.WithTimeout(10*time.Second))
			}
			assert.NilError(t, serve.Process.Signal(syscall.SIGINT))
			waitExit(t, serve)
			assert.Equal(t, serve.ProcessState.ExitCode(), 0, serveErr.String())
			_, err = os.Stat(filepath.Join(dir, "net.sock"))
			assert.Check(t, os.IsNotExist(err), "the socket is left")
			for _, f := range []string{"timeline.jsonl", "network.pcapng"} {
				_, err := os.Stat(filepath.Join(dir, "artifacts", c.guest, f))
				assert.Check(t, err == nil, "no %s for %s", f, c.guest)
			}
			assert.Check(t, is.Len(processesUsing(tmp), 0), "left running")
			assert.Check(t, is.Len(leftovers(tmp), 0), "left behind")
		})
	}
}

// TestServeReconnects: where QEMU's stream netdev can reconnect (QEMU 8.0
// and later; the probe decides), a QEMU started from serve's line while no
// serve runs — a killed serve's socket still in the folder — joins the
// serve started after it in the same folder and reaches the marker.
// Skipped on a QEMU that connects once (7.2), where serve prints no option.
func TestServeReconnects(t *testing.T) {
	needGuests(t)
	guestTest(t)
	if !selected("arm64", "uboot") {
		t.Skip("arm64/uboot not selected")
	}
	if opt := qemu.StreamReconnect("arm64"); opt == "" {
		t.Skipf("%s connects once (no reconnect option for -netdev stream)", qemu.Version("arm64"))
	}
	bin := buildNBH(t)
	dir := filepath.Join(t.TempDir(), "serve")
	serveLine := func() (*exec.Cmd, *syncBuffer, string) {
		serve := exec.Command(bin, "serve", "--arch", "arm64", "--firmware", "uboot", "--dir", dir)
		var out syncBuffer
		serve.Stdout, serve.Stderr = &out, &out
		assert.NilError(t, serve.Start())
		var line string
		poll.WaitOn(t, func(poll.LogT) poll.Result {
			for _, l := range strings.Split(out.String(), "\n") {
				if l = strings.TrimSpace(l); strings.HasPrefix(l, "qemu-system-") {
					line = l
				}
			}
			if line != "" && strings.Contains(out.String(), "nbh serve: ready") {
				return poll.Success()
			}
			return poll.Continue("serve is not ready")
		}, poll.WithTimeout(60*time.Second))
		return serve, &out, line
	}
	first, _, line := serveLine()
	assert.Assert(t, strings.Contains(line, ",reconnect"), "serve printed no reconnect option: %s", line)
	// Killed: its socket stays in the folder, nobody answers on it.
	first.Process.Kill()
	first.Wait()
	_, err := os.Lstat(filepath.Join(dir, "net.sock"))
	assert.NilError(t, err, "the killed serve's socket is gone; the test needs it there")

	argv := shellSplit(line)
	q := exec.Command(argv[0], argv[1:]...)
	var console syncBuffer
	q.Stdout, q.Stderr = &console, &console
	assert.NilError(t, q.Start())
	defer q.Process.Kill()
	time.Sleep(3 * time.Second) // QEMU runs, with nothing to join yet

	second, out, _ := serveLine()
	defer second.Process.Kill()
	waitMarker(t, &console)
	assert.Check(t, is.Regexp(`\] g1\s+joined `, out.String()))
	waitExit(t, q)
	assert.NilError(t, second.Process.Signal(syscall.SIGINT))
	waitExit(t, second)
}
