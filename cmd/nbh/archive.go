package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"nbh.dev/nbh/fixtures"
	"nbh.dev/nbh/harness/archive"
	"nbh.dev/nbh/images"
	"nbh.dev/nbh/internal/fsutil"
)

func archiveCmd(ctx context.Context, args []string) int {
	if len(args) > 0 && (args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
		args = []string{"build", "--help"}
	}
	if len(args) == 0 || args[0] != "build" {
		fmt.Fprintln(os.Stderr, "usage: nbh archive build --root DIR --files LIST --out FILE [flags] (nbh archive build --help)")
		return exitUsage
	}
	fs := flag.NewFlagSet("archive build", flag.ContinueOnError)
	root := fs.String("root", "", "the root tree the archive is for (required)")
	files := fs.String("files", "", "the file list (required): one root path a line, a glob (/etc/modprobe.d/*.conf) or a folder; 'config PATH' marks editable configuration; # comments")
	out := fs.String("out", "", "where to write the archive (required); its manifest goes to OUT.manifest.json")
	arch := fs.String("arch", "", "the root's architecture, amd64, arm64 or riscv64, for nbh's init and busybox (default: what the root's kernel modules are built for)")
	kver := fs.String("kernel-version", "", "the kernel whose modules to carry, when the root has several (lib/modules/VERSION)")
	compression := fs.String("compression", "gzip", "gzip or zstd")
	cache := fs.String("cache", os.Getenv("NBH_CACHE"), "image cache folder (default: $NBH_CACHE, else .cache in the nbh source tree)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: nbh archive build --root DIR --files LIST --out FILE [flags]

Builds a boot archive for a root tree, as mkinitramfs or bootadm would:
nbh's init and busybox, the network, NIC, NFS and iSCSI modules of the
root's own kernel with their dependencies, and the root's files the list
names, each recorded in the archive's manifest (/etc/nbh/manifest.json, and
OUT.manifest.json) as a copy of its root path. The same root and list give
the same bytes. Modules of nbh's lists that the root's kernel lacks are left
out (it needs one network driver); modules must be plain .ko files. Boot it
with the root's kernel onto the root:

  nbh boot --root nfs --root-dir DIR --kernel DIR/boot/vmlinuz-VERSION --initrd OUT

When a listed file changes on the root, the init says the archive is stale
(NBH-ARCHIVE stale) after it mounts the root (NFS or iSCSI), and on an NFS
root the boot server's own comparison at the mount records a stale-archive
event naming it.

Flags:
`)
		fs.PrintDefaults()
	}
	if code, ok := parse(fs, args[1:]); !ok {
		return code
	}
	if *root == "" || *files == "" || *out == "" {
		fmt.Fprintln(os.Stderr, "nbh archive build: --root, --files and --out are required")
		return exitUsage
	}
	if *compression != archive.Gzip && *compression != archive.Zstd {
		fmt.Fprintf(os.Stderr, "nbh archive build: --compression %q: want gzip or zstd\n", *compression)
		return exitUsage
	}
	f, err := os.Open(*files)
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh archive build: %v\n", err)
		return exitUsage
	}
	list, err := archive.ReadList(f)
	f.Close()
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh archive build: %s: %v\n", *files, err)
		return exitUsage
	}
	tracked, err := archive.ExpandList(*root, list)
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh archive build: %v\n", err)
		return exitUsage
	}
	k, err := fixtures.RootKernel(*root, *arch, *kver)
	if err == nil && *arch == "" {
		fmt.Fprintf(os.Stderr, "nbh archive build: the root's kernel %s is for %s\n", k.Version, k.Arch)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh archive build: %v\n", err)
		return exitUsage
	}
	work, err := os.MkdirTemp("", "nbh-archive-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh archive build: %v\n", err)
		return exitSetup
	}
	defer os.RemoveAll(work)
	c := images.Open(*cache)
	c.Log = os.Stderr
	res, err := fixtures.FromRoot(ctx, c, k, *root, tracked, *compression, work)
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbh archive build: %v\n", err)
		return exitSetup
	}
	if err := os.MkdirAll(filepath.Dir(*out), 0o755); err != nil {
		fmt.Fprintf(os.Stderr, "nbh archive build: %v\n", err)
		return exitSetup
	}
	if err := fsutil.CopyFile(res.Path, *out); err != nil {
		fmt.Fprintf(os.Stderr, "nbh archive build: %v\n", err)
		return exitSetup
	}
	if err := os.WriteFile(*out+".manifest.json", res.Manifest.Marshal(), 0o644); err != nil {
		fmt.Fprintf(os.Stderr, "nbh archive build: %v\n", err)
		return exitSetup
	}
	fi, _ := os.Stat(*out)
	fmt.Printf("%s: %d bytes, kernel %s, %d files of the root, key %s\nmanifest: %s\n", *out, fi.Size(), k.Version, len(tracked), res.Key[:12], *out+".manifest.json")
	return exitOK
}
