// Package browser renders a page in headless Chromium and returns the DOM
// its scripts left: how tests check the HTML report in a real browser.
package browser

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// ErrNoChromium is returned when no Chromium is on PATH.
var ErrNoChromium = errors.New("chromium not found (Debian package chromium; make setup installs it)")

// Binary is the Chromium on PATH, or "".
func Binary() string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// DumpDOM loads url in headless Chromium (a throwaway profile, no network
// but the page's own files) and returns the serialised DOM after load.
// Chromium that crashes (a segmentation fault under a loaded machine was
// seen once in a few hundred runs) is started again, twice at most: the
// page is not what crashed it.
func DumpDOM(ctx context.Context, url string) (string, error) {
	var err error
	for try := 0; try < 3; try++ {
		var dom string
		var crashed bool
		if dom, crashed, err = dumpDOM(ctx, url); err == nil || !crashed || ctx.Err() != nil {
			return dom, err
		}
	}
	return "", err
}

func dumpDOM(ctx context.Context, url string) (dom string, crashed bool, err error) {
	bin := Binary()
	if bin == "" {
		return "", false, ErrNoChromium
	}
	profile, err := os.MkdirTemp("", "nbh-chromium-")
	if err != nil {
		return "", false, err
	}
	defer os.RemoveAll(profile)
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "--headless", "--no-sandbox", "--disable-gpu",
		"--no-first-run", "--disable-extensions", "--disable-background-networking",
		"--user-data-dir="+profile, "--virtual-time-budget=5000", "--dump-dom", url)
	cmd.Env = append(os.Environ(), "HOME="+profile)
	// Chromium starts helpers; they all go with its process group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	err = cmd.Run()
	if cmd.Process != nil {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	if err != nil {
		tail := stderr.String()
		if len(tail) > 2000 {
			tail = tail[len(tail)-2000:]
		}
		if cmd.ProcessState != nil && ctx.Err() == nil {
			ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus)
			crashed = ok && ws.Signaled()
		}
		return "", crashed, fmt.Errorf("chromium %s: %v: %s", url, err, tail)
	}
	return out.String(), false, nil
}
