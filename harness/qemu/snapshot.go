package qemu

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"nbh.dev/nbh/internal/fsutil"
)

// A machine's saved state (a warm start, package harness/warm) is QEMU's
// migration stream written to a file: the RAM, the devices, the flash
// contents. It is only as good as its match with the QEMU that loads it:
// SnapshotKey names everything that decides what the machine did up to
// the moment it was saved.

// SnapshotKey is a digest of what decides a machine's state from reset up
// to its first request on the network: the QEMU binary (its file and
// version) and the files in its data folders (its default firmware and
// option ROMs), the command line without the paths that differ from guest
// to guest, and the content of every file the command line names (firmware
// code, the variables the guest's copy is made from, U-Boot's environment,
// option ROMs). Two guests with the same key start the same machine.
func SnapshotKey(c Config) (string, error) {
	c.Dir, c.QMP, c.NetFD, c.Incoming = "/nbh-guest", "/nbh-guest/qmp", 3, ""
	if c.NetSocket != "" || c.UserNet != nil || c.TapNet != nil {
		return "", fmt.Errorf("qemu: only a guest on an inherited stream socket can be restored")
	}
	args, err := args(c, false)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	id, err := binaryID(c.Arch)
	if err != nil {
		return "", err
	}
	fmt.Fprintf(h, "qemu %s\n", id)
	if c.Accel.Name == "kvm" {
		// The machine's CPU is the host's (-cpu host): its model and
		// features, and the kernel that runs KVM, are the machine too.
		fmt.Fprintf(h, "host %s\n", hostCPU())
	}
	vars := filepath.Join(c.Dir, "vars.fd")
	for _, a := range args {
		parts := strings.Split(a, ",")
		for i, p := range parts {
			k, v, ok := strings.Cut(p, "=")
			if !ok {
				k, v = "", p
			}
			if v == vars {
				v = c.Files.Vars // the guest's copy starts as this file
			}
			if !filepath.IsAbs(v) || v == c.QMP {
				continue
			}
			if _, err := os.Stat(v); err != nil && v != c.Files.Vars {
				continue // not a file (a kernel argument such as root=/dev/nfs)
			}
			d, err := contentDigest(v)
			if err != nil {
				return "", fmt.Errorf("qemu: snapshot key: %w", err)
			}
			if k != "" {
				parts[i] = k + "=" + d
			} else {
				parts[i] = d
			}
		}
		fmt.Fprintf(h, "%s\n", strings.Join(parts, ","))
	}
	return hex.EncodeToString(h.Sum(nil))[:32], nil
}

// binaryID is QEMU's binary for arch as a line: its path, size, time and
// version, and the files of its data folders (what -L help lists): the
// default firmware and ROMs it loads without being told.
func binaryID(arch string) (string, error) {
	idMu.Lock()
	defer idMu.Unlock()
	if id, ok := ids[arch]; ok {
		return id, nil
	}
	bin, err := exec.LookPath(Binary(arch))
	if err != nil {
		return "", fmt.Errorf("qemu: %s is not installed: %w", Binary(arch), err)
	}
	fi, err := os.Stat(bin)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s %d %d %s\n", bin, fi.Size(), fi.ModTime().UnixNano(), Version(arch))
	out, err := exec.Command(bin, "-L", "help").Output()
	if err != nil {
		return "", fmt.Errorf("qemu: %s -L help: %w", bin, err)
	}
	for _, dir := range strings.Fields(string(out)) {
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue // listed but absent
		}
		for _, e := range ents {
			p := filepath.Join(dir, e.Name())
			if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
				// A file's size and time, not its content: a package
				// update changes both; hashing every ROM QEMU ships on
				// each run would cost more than the warm start saves.
				fmt.Fprintf(h, "%s %d %d\n", p, fi.Size(), fi.ModTime().UnixNano())
			}
		}
	}
	id := fmt.Sprintf("%x", h.Sum(nil))
	ids[arch] = id
	return id, nil
}

var (
	idMu sync.Mutex
	ids  = map[string]string{}
)

// contentDigest is "sha256:..." of a file's content, or of a folder's
// regular files (names and contents). Digests are remembered by path, size
// and time for the life of the process (a firmware image is read once).
func contentDigest(path string) (string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", err
	}
	memo := fmt.Sprintf("%s\x00%d\x00%d\x00%v", path, fi.Size(), fi.ModTime().UnixNano(), fi.IsDir())
	digestMu.Lock()
	d, ok := digests[memo]
	digestMu.Unlock()
	if ok && !fi.IsDir() {
		return d, nil
	}
	h := sha256.New()
	if fi.IsDir() {
		var names []string
		err = filepath.WalkDir(path, func(p string, e fs.DirEntry, err error) error {
			if err == nil && e.Type().IsRegular() {
				names = append(names, p)
			}
			return err
		})
		if err != nil {
			return "", err
		}
		sort.Strings(names)
		for _, n := range names {
			rel, _ := filepath.Rel(path, n)
			fd, err := contentDigest(n)
			if err != nil {
				return "", err
			}
			fmt.Fprintf(h, "%s %s\n", rel, fd)
		}
		d = "sha256:" + hex.EncodeToString(h.Sum(nil))
	} else {
		sum, err := fsutil.SHA256File(path)
		if err != nil {
			return "", err
		}
		d = "sha256:" + sum
	}
	digestMu.Lock()
	digests[memo] = d
	digestMu.Unlock()
	return d, nil
}

var (
	digestMu sync.Mutex
	digests  = map[string]string{}
)

// hostCPU is the host's first CPU as /proc/cpuinfo shows it (without the
// lines that change as it runs), and the kernel's release.
func hostCPU() string {
	var b strings.Builder
	if info, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		first, _, _ := strings.Cut(string(info), "\n\n")
		for _, l := range strings.Split(first, "\n") {
			k, _, _ := strings.Cut(l, ":")
			switch strings.TrimSpace(k) {
			case "cpu MHz", "bogomips", "BogoMIPS":
				continue
			}
			b.WriteString(l + "\n")
		}
	}
	if rel, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		b.Write(rel)
	}
	return b.String()
}

// shellQuote quotes s for /bin/sh (QEMU's exec: migration URIs).
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// ErrCannotSave is a machine QEMU refuses to save: a device or a setting
// that blocks migration. Any other failure to save (a full disk) may pass.
var ErrCannotSave = errors.New("QEMU cannot save this machine")

// SaveState stops the machine and writes its state to path (QEMU's
// migration stream; the machine stays stopped: Cont goes on). It returns
// once the state is complete, or an error (ErrCannotSave, with QEMU's
// reason, for a machine that cannot be saved).
func (p *Process) SaveState(path string, timeout time.Duration) error {
	if _, err := p.Run("stop", nil); err != nil {
		return err
	}
	if _, err := p.Run("migrate", map[string]any{"uri": "exec:cat > " + shellQuote(path)}); err != nil {
		if blocked.MatchString(err.Error()) {
			return fmt.Errorf("%w: %v", ErrCannotSave, err)
		}
		return err
	}
	deadline := time.Now().Add(timeout)
	for {
		out, err := p.Run("query-migrate", nil)
		if err != nil {
			return err
		}
		var m struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := json.Unmarshal(out, &m); err != nil {
			return fmt.Errorf("qmp query-migrate: %w", err)
		}
		switch m.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			if m.ErrorDesc == "" {
				m.ErrorDesc = m.Status
			}
			if blocked.MatchString(m.ErrorDesc) {
				return fmt.Errorf("%w: %s", ErrCannotSave, m.ErrorDesc)
			}
			return fmt.Errorf("qemu: the machine's state was not saved: %s", m.ErrorDesc)
		}
		if time.Now().After(deadline) {
			p.Run("migrate_cancel", nil)
			p.waitMigration(5 * time.Second) // until it can run on
			return fmt.Errorf("qemu: saving the machine's state took more than %s", timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitMigration waits for a cancelled migration to end.
func (p *Process) waitMigration(timeout time.Duration) {
	for end := time.Now().Add(timeout); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		out, err := p.Run("query-migrate", nil)
		if err != nil || !strings.Contains(string(out), `"cancelling"`) && !strings.Contains(string(out), `"active"`) {
			return
		}
	}
}

// blocked is how QEMU says a machine cannot migrate ("State blocked by
// non-migratable device", "... is not migratable", a migration blocker).
var blocked = regexp.MustCompile(`(?i)non-migratable|not migratable|blocked|blocker`)

// ErrRestore is a saved state QEMU did not load.
var ErrRestore = errors.New("the saved state did not load")

// WaitIncoming waits until a QEMU started with Config.Incoming has loaded
// the state: it is then paused where the state was saved (Cont runs it).
func (p *Process) WaitIncoming(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		select {
		case <-p.exited:
			return fmt.Errorf("%w: qemu exited: %s", ErrRestore, p.Stderr())
		default:
		}
		st, err := p.Status()
		if err != nil {
			// QMP goes with a QEMU that gave the load up.
			select {
			case <-p.exited:
				return fmt.Errorf("%w: qemu exited: %s", ErrRestore, p.Stderr())
			case <-time.After(2 * time.Second):
			}
			return fmt.Errorf("%w: %v", ErrRestore, err)
		}
		switch st {
		case "paused", "postmigrate":
			return nil
		case "inmigrate", "prelaunch", "restore-vm":
		default:
			return fmt.Errorf("%w: the machine is %q: %s", ErrRestore, st, p.Stderr())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w within %s (the machine still %q)", ErrRestore, timeout, st)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Cont runs a stopped machine.
func (p *Process) Cont() error {
	_, err := p.Run("cont", nil)
	return err
}
