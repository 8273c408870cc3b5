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
func DumpDOM(ctx context.Context, url string) (string, error) {
	bin := Binary()
	if bin == "" {
		return "", ErrNoChromium
	}
	profile, err := os.MkdirTemp("", "nbh-chromium-")
	if err != nil {
		return "", err
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
		return "", fmt.Errorf("chromium %s: %v: %s", url, err, tail)
	}
	return out.String(), nil
}
