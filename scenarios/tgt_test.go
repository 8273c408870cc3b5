package scenarios

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"nbh.dev/nbh/fixtures"
	"nbh.dev/nbh/harness/nbhtest"
)

// tgtIQN is the target the comparison configures in Debian's tgt.
const tgtIQN = "iqn.2026-11.dev.nbh:tgt"

// startTGT runs Debian's tgtd on a loopback port with the reference root
// (plus extra files) as LUN 1, for comparing the lab's iSCSI target with
// it. It returns the portal address, or skips when tgt is not installed.
func startTGT(b *testing.B, arch string, extra map[string]string) string {
	for _, tool := range []string{"tgtd", "tgtadm"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skipf("Debian's tgt is not installed (%s): no comparison", tool)
		}
	}
	img := filepath.Join(b.TempDir(), "tgt-root.img")
	if err := fixtures.BuildRootImage(context.Background(), nbhtest.Cache(), arch, img, 160<<20, extra); err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	portal := ln.Addr().String()
	ln.Close()
	ctl := fmt.Sprint(20000 + time.Now().UnixNano()%10000)
	tgtd := exec.Command("tgtd", "-f", "-C", ctl, "--iscsi", "portal="+portal)
	if err := tgtd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		tgtd.Process.Kill()
		tgtd.Wait()
		// tgtd keeps its management socket under /var/run/tgtd.
		for _, f := range []string{"socket." + ctl, "socket." + ctl + ".lock"} {
			os.Remove(filepath.Join("/var/run/tgtd", f))
		}
	})
	adm := func(args ...string) {
		var err error
		for try := 0; try < 50; try++ { // tgtd takes a moment to listen
			var out []byte
			if out, err = exec.Command("tgtadm", append([]string{"-C", ctl, "--lld", "iscsi"}, args...)...).CombinedOutput(); err == nil {
				return
			} else {
				err = fmt.Errorf("tgtadm %v: %v: %s", args, err, out)
			}
			time.Sleep(100 * time.Millisecond)
		}
		b.Fatal(err)
	}
	adm("--op", "new", "--mode", "target", "--tid", "1", "-T", tgtIQN)
	adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", img)
	adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
	return portal
}
