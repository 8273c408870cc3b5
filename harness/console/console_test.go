package console

import (
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/term"
	"gotest.tools/v3/assert"
	"gotest.tools/v3/poll"

	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/timeline"
)

// Lines as the firmware, loaders, kernel and init really print them.
// Clean keeps text and drops what a terminal would not show as text:
// escapes, control bytes, and bytes that are not UTF-8 (the code page 437
// box around shim's dialogs, where its bytes do not happen to form UTF-8:
// "\xc4\xbf" is a valid "\u013f").
func TestCleanDropsWhatIsNotText(t *testing.T) {
	assert.Equal(t, Clean("\x1b[01;01H\xda\xc4\xc4 ERROR \xb3\r\n"), " ERROR ")
	assert.Equal(t, Clean("\xc4\xc4\xbf"), "\u013f")
	assert.Equal(t, Clean("caf\u00e9 \u2500"), "caf\u00e9 \u2500")
}

func TestClassify(t *testing.T) {
	cases := []struct {
		line    string
		reached timeline.Stage
		before  []string
		want    failure.Reason
	}{
		{"nbh-init: FAIL dhcp: unable to receive an offer", timeline.Init, nil, failure.NoDHCP},
		{"nbh-init: FAIL modules: insmod /lib/x.ko: exec format error", timeline.Init, nil, failure.ModuleLoad},
		{"[    1.6] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000", timeline.Kernel, nil, failure.KernelPanic},
		{"[    2.0] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)", timeline.Kernel, nil, failure.RootMount},
		{"http://10.0.2.2/g1/vmlinuz... No such file or directory (http://ipxe.org/2d0c613b)", timeline.Loader, nil, failure.LoaderFetch},
		{"Configuring (net0 52:54:00:4e:42:01)...... No configuration methods succeeded (http://ipxe.org/040ee186)", timeline.DHCP, nil, failure.NoDHCP},
		{"Could not boot image: Exec format error (http://ipxe.org/2e008081)", timeline.Loader, nil, failure.LoaderError},
		{"TFTP error: 'file not found' (1)", timeline.Loader, []string{"Filename 'g1/vmlinuz'.", "Load address: 0x40400000", "Loading: *"}, failure.LoaderFetch},
		{"Retry time exceeded; starting again", timeline.DHCP, nil, failure.NoDHCP},
		{"error: file `/g1/vmlinuz' not found.", timeline.Loader, nil, failure.LoaderFetch},
		{"error: you need to load the kernel first.", timeline.Loader, nil, failure.LoaderError},
		{"  PXE-E16: No valid offer received.", timeline.DHCP, nil, failure.NoDHCP},
		{"  PXE-E23: Client received TFTP error from server.", timeline.Loader, nil, failure.LoaderFetch},
		{"No bootable device.", timeline.Firmware, nil, failure.FirmwareNoBoot},
		{"  Client Error: 404 Not Found", timeline.Loader, nil, failure.LoaderFetch},
		{"!!!! X64 Exception Type - 06(#UD - Invalid Opcode)  CPU Apic ID - 00000000 !!!!", timeline.Loader, nil, failure.LoaderError},
		{"Could not open SAN device: Operation not permitted (http://ipxe.org/410d618f)", timeline.Loader, nil, failure.SANBoot},
		{"  Error: Could not retrieve NBP file size from HTTP server.", timeline.Loader, nil, failure.LoaderFetch},
		{"  Error: Unexpected network error.", timeline.Loader, nil, failure.LoaderFetch},
		{"nbh-init: FAIL archive: stale boot archive: 1 file(s) changed on the root since the archive was built: /etc/nbh/boot.conf (nbh.archive=warn boots on)", timeline.Root, nil, failure.StaleArchive},
		{"nbh-init: FAIL archive: stale boot archive: modules for kernel 6.1.0-0-nbh-skew, running 6.1.0-56-amd64 (nbh.archive=warn boots on)", timeline.Init, nil, failure.StaleArchive},
		{"nbh-init: FAIL missing-module: /lib/modules/6.1.0-56-amd64/kernel/fs/nfs/nfsv3.ko is not in the archive, nor on the boot server (404 Not Found)", timeline.Root, nil, failure.MissingModule},
		{"[    2.1] Initramfs unpacking failed: crc error", timeline.Kernel, nil, failure.CorruptArchive},
		// Debian's initramfs-tools and dracut giving up.
		{"Gave up waiting for root file system device.  Common problems:", timeline.Root, nil, failure.RootMount},
		{"ALERT!  /dev/sda does not exist.  Dropping to a shell!", timeline.Root, nil, failure.RootMount},
		{"ipconfig: no devices to configure", timeline.Root, nil, failure.NoNetDevice},
		{"[  190.1] dracut Warning: Could not boot.", timeline.Init, nil, failure.RootMount},
		{"Warning: /dev/sda does not exist", timeline.Init, nil, failure.RootMount},
		{"Entering emergency mode. Exit the shell to continue.", timeline.Init, nil, failure.InitFailed},
		// Secure Boot's refusals, as OVMF with Debian's shim 16.1 and GRUB
		// 2.06 printed them (shim's dialog box as the console cleans it).
		{"error: bad shim signature.", timeline.Loader, nil, failure.SecureBoot},
		// GRUB's video warning is no failure, but an error after it is.
		{"error: out of memory.", timeline.Loader, []string{"error: no suitable video mode found.", "Booting in blind mode"}, failure.LoaderError},
		{Clean("\x1b[0m\x1b[37m\x1b[44m\x1b[01;01H\xda\x1b[01;01H\xda\xc4\xc4\xc4\xbf\x1b[02;01H\xb3                                    ERROR                                     \xb3\x1b[03;01H\xb3                Verification failed: (0x1A) Security Violation                \xb3\x1b[04;01H OK"), timeline.Loader, nil, failure.SecureBoot},
		{`BdsDxe: failed to load Boot0001 "UEFI PXEv4 (MAC:525400123456)" from PciRoot(0x0)/Pci(0x1,0x0)/MAC(525400123456,0x1)/IPv4(0.0.0.0,0x0,DHCP,0.0.0.0,0.0.0.0,0.0.0.0): Access Denied`, timeline.Loader, nil, failure.SecureBoot},
		{`BdsDxe: failed to start Boot0001 "UEFI HTTPv4 (MAC:525400123456)" from PciRoot(0x0)/Pci(0x1,0x0)/MAC(525400123456,0x1)/IPv4(0.0.0.0,0x0,DHCP,0.0.0.0,0.0.0.0,0.0.0.0)/Uri(): Security Violation`, timeline.Loader, nil, failure.SecureBoot},
	}
	for _, c := range cases {
		p, ok := Classify(c.line, c.reached, c.before)
		assert.Assert(t, ok, "not classified: %q", c.line)
		assert.Equal(t, p.Reason, c.want, "%q", c.line)
	}
	// Not failures: normal output, a pxelinux probe, loader words after the
	// kernel started.
	for _, c := range []struct {
		line    string
		reached timeline.Stage
		before  []string
	}{
		{"nbh-init: NBH-READY addr=10.0.2.15/24", timeline.Init, nil},
		{"TFTP error: 'file not found' (1)", timeline.Loader, []string{"Filename 'pxelinux.cfg/01-52-54-00-4e-42-01'.", "Load address: 0x40300000", "Loading: *"}},
		{"error: something a kernel driver said", timeline.Kernel, nil},
		{"error: no suitable video mode found.", timeline.Loader, nil},                                                            // GRUB boots on, blind
		{"autoexec.ipxe... Not found (https://ipxe.org/2d12618e)", timeline.Loader, nil},                                          // iPXE 1.21's probe
		{" Not found (https://ipxe.org/2d12618e)", timeline.Loader, []string{"iPXE initialising devices...", "autoexec.ipxe..."}}, // the same, split over two lines
		{"[    0.5] ACPI: PCI Interrupt Link [LNKA] enabled", timeline.Kernel, nil},
	} {
		p, ok := Classify(c.line, c.reached, c.before)
		assert.Assert(t, !ok, "%q classified as %s", c.line, p.Reason)
	}
}

// A wait holds until a later line ends it; "... done." on the wait's own
// line means it never started.
func TestWaits(t *testing.T) {
	w, ok := Waiting("Begin: Waiting up to 180 secs for any network device to become available ... [    6.2] input: ImExPS/2 Generic Explorer Mouse")
	assert.Assert(t, ok)
	assert.Equal(t, w.Reason, failure.NoNetDevice)
	assert.Assert(t, w.Until.MatchString("done."))
	assert.Assert(t, w.Until.MatchString("Begin: Retrying nfs mount ... "))
	assert.Assert(t, !w.Until.MatchString("[    7.0] virtio_net virtio0 enp0s2: renamed from eth0"))
	_, ok = Waiting("Begin: Waiting up to 180 secs for any network device to become available ... done.")
	assert.Assert(t, !ok, "a wait that ended on its own line")
	w, ok = Waiting("mount call failed - server replied: No such file or directory.")
	assert.Assert(t, ok)
	assert.Equal(t, w.Reason, failure.RootMount)
	_, ok = Waiting("nbh-init: NBH-READY addr=10.0.2.15/24")
	assert.Assert(t, !ok)
}

func TestStages(t *testing.T) {
	for line, want := range map[string]timeline.Stage{
		"[    3.451829] Run /init as init process":                             timeline.Init,
		"nbh-init: started":                                                    timeline.Init,
		"Begin: Mounting root file system ... Begin: Running /scripts/nfs-top": timeline.Root,
		"[    0.000000] Linux version 6.1.0-56-amd64 (debian-kernel@lists)":    timeline.Kernel,
		"[    3.5] Run /bin/busybox as init process":                           timeline.None,
	} {
		assert.Equal(t, StageOf(line), want, "%q", line)
	}
}

func TestClean(t *testing.T) {
	assert.Equal(t, Clean("\x1b[0m\x1b[30m\x1b[47mWelcome to GRUB!\r\n"), "Welcome to GRUB!")
	assert.Equal(t, Clean("Loading... 10%\rLoading... 100%\r\n"), "Loading... 100%")
	assert.Equal(t, Clean("a\x00b\x07c"), "abc")
}

// writer is the QEMU side of a console: a second descriptor on its terminal.
func writer(t *testing.T, con *Console) *os.File {
	fd, err := syscall.Dup(int(con.Tty().Fd()))
	assert.NilError(t, err)
	return os.NewFile(uintptr(fd), "tty")
}

// TestFloodAndHangup: a guest printing megabytes, much of it without a
// newline, is read to the end, lines stay bounded, and the stream ends as
// soon as the writer goes away (the console never waits on its own copy of
// the terminal).
func TestFloodAndHangup(t *testing.T) {
	var log strings.Builder
	con, err := New(&log, time.Now())
	assert.NilError(t, err)
	defer con.Close()
	w := writer(t, con)
	con.Started()
	go func() {
		long := strings.Repeat("x", 3<<20) // 3 MiB without a newline
		for i := 0; i < 20000; i += 10 {
			var batch strings.Builder // several lines in one write, as a guest's burst
			for j := i; j < i+10; j++ {
				fmt.Fprintf(&batch, "line %d of the flood\r\n", j)
			}
			w.WriteString(batch.String())
		}
		w.WriteString(long + "\n")
		w.WriteString("the end\n")
		w.Close()
	}()
	var n int
	last := -1
	var sawEnd bool
	for l := range con.Lines() {
		n++
		assert.Assert(t, len(l.Text) <= MaxLine)
		if strings.HasPrefix(l.Text, "line ") {
			var i int
			fmt.Sscanf(l.Text, "line %d", &i)
			// Every line arrives, once, as a line of its own (a read
			// that brings several must not lose any).
			assert.Equal(t, i, last+1, "after line %d: %q", last, l.Text)
			last = i
		}
		sawEnd = sawEnd || l.Text == "the end"
	}
	assert.Equal(t, last, 19999)
	assert.Assert(t, sawEnd)
	assert.Assert(t, n > 20000+(3<<20)/MaxLine-2, "only %d lines", n)
	poll.WaitOn(t, func(poll.LogT) poll.Result {
		select {
		case <-con.Done():
			return poll.Success()
		default:
			return poll.Continue("console still open")
		}
	}, poll.WithTimeout(5*time.Second))
}

// TestWrappedFirmwareLinesAreJoined: SeaBIOS wraps at 80 columns, cutting
// iPXE's error codes off their message.
func TestWrappedFirmwareLinesAreJoined(t *testing.T) {
	con, err := New(nil, time.Now())
	assert.NilError(t, err)
	defer con.Close()
	w := writer(t, con)
	con.Started()
	msg := "http://10.0.2.2/g1/vmlinuz... No such file or directory (http://ipxe.org/2d0c613b)"
	w.WriteString(msg[:80] + "\r\n" + msg[80:] + "\r\n")
	w.Close()
	var got []string
	for l := range con.Lines() {
		got = append(got, l.Text)
	}
	assert.DeepEqual(t, got, []string{msg})
}

// TestRawKeepsWrappedLines: a line the firmware-width rule joins with the
// next is one line of Text, and its Raw keeps the break (a conversation's
// output of exactly 80 columns is two lines).
func TestRawKeepsWrappedLines(t *testing.T) {
	con, err := New(nil, time.Now())
	assert.NilError(t, err)
	defer con.Close()
	w := writer(t, con)
	con.Started()
	first := strings.Repeat("a", WrapWidth)
	w.WriteString(first + "\r\nsecond\r\n")
	w.Close()
	var got []Line
	for l := range con.Lines() {
		got = append(got, l)
	}
	assert.Equal(t, len(got), 1)
	assert.Equal(t, got[0].Text, first+"second")
	assert.Equal(t, strings.ReplaceAll(got[0].Raw, "\r", ""), first+"\nsecond")
}

// TestSendToAGuestThatDoesNotRead: typing into a terminal nobody reads
// ends with ErrNotReading within the timeout (not a Send blocked for
// ever), later typing fails at once, and once the guest reads, typing
// works again and the first bytes arrive first.
func TestSendToAGuestThatDoesNotRead(t *testing.T) {
	defer func(d time.Duration) { sendTimeout = d }(sendTimeout)
	sendTimeout = 300 * time.Millisecond
	con, err := New(nil, time.Now())
	assert.NilError(t, err)
	defer con.Close()
	tty := con.Tty() // the guest's side: nobody reads it yet
	// Raw, as QEMU sets its serial terminal: a full input buffer holds
	// the writer back (canonical mode would drop the excess instead).
	_, err = term.MakeRaw(int(tty.Fd()))
	assert.NilError(t, err)
	big := strings.Repeat("x", 1<<20)
	start := time.Now()
	err = con.Send(big)
	assert.ErrorIs(t, err, ErrNotReading)
	assert.Assert(t, time.Since(start) < 5*time.Second)
	assert.ErrorIs(t, con.Send("y"), ErrNotReading)

	// The guest reads again: the first Send completes, then others go.
	go io.Copy(io.Discard, tty)
	deadline := time.Now().Add(10 * time.Second)
	for {
		err = con.Send("z\n")
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	assert.NilError(t, err)
}

// A restored machine's console: what it showed before its state was saved
// comes first, as lines marked replayed, then its own output, the line it
// left unfinished completed; the raw stream of a console that keeps it is
// everything, the replay byte for byte. A long replay never waits for a
// reader of its lines.
func TestStartedAfterASavedConsole(t *testing.T) {
	var log strings.Builder
	con, err := New(&log, time.Now())
	assert.NilError(t, err)
	defer con.Close()
	con.KeepRaw()
	w := writer(t, con)
	var before strings.Builder
	for i := 0; i < 6000; i++ {
		fmt.Fprintf(&before, "firmware line %d \xb3\r\n", i) // CP437, as EDK2's boxes
	}
	before.WriteString("\x1b[2J>>Start PXE over IPv4.")
	done := make(chan struct{})
	go func() {
		con.StartedAfter([]byte(before.String()))
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("StartedAfter waits for its lines to be read")
	}
	w.WriteString("\r\n  Station IP address is 10.0.2.15\r\n")
	w.Close()
	var lines []Line
	for l := range con.Lines() {
		lines = append(lines, l)
	}
	assert.Equal(t, lines[0].Text, "firmware line 0 ")
	assert.Assert(t, lines[0].Replayed)
	var replayed int
	for _, l := range lines {
		if l.Replayed {
			replayed++
		}
	}
	assert.Equal(t, replayed, 6001, "every saved line, the cut one too, and nothing after")
	last := lines[len(lines)-1]
	assert.Equal(t, last.Text, "  Station IP address is 10.0.2.15")
	assert.Assert(t, !last.Replayed)
	assert.Assert(t, strings.Contains(log.String(), ">>Start PXE over IPv4."))
	raw := string(con.Raw())
	assert.Assert(t, strings.HasPrefix(raw, before.String()), "the replay is not kept byte for byte")
	assert.Assert(t, strings.HasSuffix(strings.ReplaceAll(raw, "\r", ""), "Station IP address is 10.0.2.15\n"), "%q", raw[len(raw)-100:])
}
