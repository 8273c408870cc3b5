package harness

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"nbh.dev/nbh/harness/console"
	"nbh.dev/nbh/harness/timeline"
)

// A conversation with a booted guest on its serial console, the way a
// person at the console would have it: wait for a prompt (Expect), type
// (Send), run a command and read its output and exit status (Run), log in
// (Login), reboot (Reboot, Reset) and power off (PowerOff). It works with
// any shell on the console: the reference init's and root's (Spec.Shell)
// and a distribution's after Login.

var (
	errNotStarted = errors.New("the guest was never started (Lab.Boot starts it; Provision only prepares it)")
	errClosed     = errors.New("the guest is closed")
)

// A guest keeps at most maxTalkLines console lines, of maxTalkBytes, for
// Expect and Run; older ones are dropped (a conversation looks at what came
// after its position), so a chatty guest cannot take the harness's memory.
const (
	maxTalkLines = 20000
	maxTalkBytes = 8 << 20
)

// talk is the guest's console as a conversation: the lines so far and the
// position Expect and Run read from.
type talk struct {
	mu    sync.Mutex
	lines []console.Line
	base  int // the number of lines dropped before lines[0]
	bytes int // of the lines kept
	pos   int // the line (counted from the first) the next Expect looks at first
	ended bool
	wake  chan struct{} // closed, and replaced, when a line arrives
}

// hear keeps a console line for the conversation.
func (g *Guest) hear(l console.Line) {
	t := &g.talk
	t.mu.Lock()
	t.lines = append(t.lines, l)
	t.bytes += len(l.Text) + len(l.Raw)
	if len(t.lines) > maxTalkLines || t.bytes > maxTalkBytes {
		drop := len(t.lines) / 2
		for _, d := range t.lines[:drop] {
			t.bytes -= len(d.Text) + len(d.Raw)
		}
		t.lines = append([]console.Line(nil), t.lines[drop:]...)
		t.base += drop
	}
	t.signal()
	t.mu.Unlock()
}

// hearEnd says the console ended (QEMU exited).
func (g *Guest) hearEnd() {
	t := &g.talk
	t.mu.Lock()
	t.ended = true
	t.signal()
	t.mu.Unlock()
}

// signal wakes waiters. Called with mu held.
func (t *talk) signal() {
	if t.wake != nil {
		close(t.wake)
	}
	t.wake = make(chan struct{})
}

// waitLine calls match on each console line from line number from on, in
// order, until it returns true (and gives that line's number), ctx ends,
// the console ends, or the current boot fails before its verdict was good.
func (g *Guest) waitLine(ctx context.Context, from int, what string, match func(console.Line) bool) (int, error) {
	if g.con == nil {
		return 0, errNotStarted
	}
	ctx, cancel := g.talkDeadline(ctx)
	defer cancel()
	t := &g.talk
	for {
		t.mu.Lock()
		if from < t.base {
			from = t.base
		}
		for ; from < t.base+len(t.lines); from++ {
			if match(t.lines[from-t.base]) {
				t.mu.Unlock()
				return from, nil
			}
		}
		ended := t.ended
		if t.wake == nil {
			t.wake = make(chan struct{})
		}
		wake := t.wake
		t.mu.Unlock()
		if ended {
			return 0, g.talkError(what, "the console ended: QEMU exited")
		}
		var failed <-chan struct{}
		b := g.current()
		if v, ok := g.Verdict(); !ok || !v.OK {
			failed = b.j.Decided()
		}
		select {
		case <-wake:
		case <-failed:
			if v, _ := g.Verdict(); !v.OK {
				return 0, fmt.Errorf("%s: the boot failed instead: %w", what, v.Err())
			}
		case <-ctx.Done():
			return 0, g.talkError(what, ctx.Err().Error())
		}
	}
}

// talkDeadline bounds a conversation step: ctx's deadline, or the spec's
// Timeout from now when ctx has none (a step never waits forever).
func (g *Guest) talkDeadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, g.spec.Timeout)
}

// talkError says what a step waited for and the console's last lines.
func (g *Guest) talkError(what, why string) error {
	tail := g.con.Tail(5)
	return fmt.Errorf("%s: %s; the console's last lines: %q", what, why, tail)
}

// Expect waits for a console line matching pattern (a regexp) after the
// conversation's position, moves the position past it and returns the
// matched text. It returns an error when ctx ends (without a deadline of
// its own: after Spec.Timeout), when the console ends, or, if the current
// boot has no good verdict yet, when it fails instead (the error wraps its
// BootError). A prompt without a newline ("login: ") counts as a line.
func (g *Guest) Expect(ctx context.Context, pattern string) (string, error) {
	re, err := regexp.Compile(pattern)
	if err != nil {
		return "", fmt.Errorf("expect: %w", err)
	}
	var match string
	n, err := g.waitLine(ctx, g.position(), fmt.Sprintf("expect %q", pattern), func(l console.Line) bool {
		m := re.FindString(l.Text)
		if m == "" && !re.MatchString(l.Text) {
			return false
		}
		match = m
		return true
	})
	if err != nil {
		return "", err
	}
	g.setPosition(n + 1)
	return match, nil
}

func (g *Guest) position() int {
	g.talk.mu.Lock()
	defer g.talk.mu.Unlock()
	return g.talk.pos
}

func (g *Guest) setPosition(n int) {
	g.talk.mu.Lock()
	if n > g.talk.pos {
		g.talk.pos = n
	}
	g.talk.mu.Unlock()
}

// end is the number of the next console line to arrive.
func (g *Guest) end() int {
	g.talk.mu.Lock()
	defer g.talk.mu.Unlock()
	return g.talk.base + len(g.talk.lines)
}

// Send types s on the guest's serial console (as is: end a command with
// "\r"). A guest that takes none of it for a few seconds (its serial port
// reads nothing) gets console.ErrNotReading, never a Send blocked for ever.
func (g *Guest) Send(s string) error {
	if g.con == nil {
		return errNotStarted
	}
	if g.closed() {
		return errClosed
	}
	g.typed.Store(true) // a machine typed on is not saved for others (saveWarm)
	return g.con.Send(s)
}

// MaxRunLine bounds each line of a command Run types: a shell's line
// editor (busybox's) takes no more.
const MaxRunLine = 900

// Run runs cmd in the shell on the guest's console and returns exactly
// what it wrote (standard output and error, in the order written; its
// standard input is /dev/null) and its exit status. The output travels as
// od's decimal bytes, framed per line with a checksum, then a trailer with
// the status, size and SHA-256 (runScript), so kernel and
// service messages the console interleaves are left out, and output the
// console garbled is printed again from the guest's kept copy, up to
// runRetries times, or is an error, never a wrong answer. The guest's
// shell needs od, awk, wc, sha256sum and one writable folder of $TMPDIR,
// /tmp, /dev/shm, /run and /var/tmp (the reference init's and root's have
// them, as has any distribution's, read-only root or not).
// Control characters other than newlines are refused: a line editor would
// act on them.
func (g *Guest) Run(ctx context.Context, cmd string) (output string, status int, err error) {
	for _, line := range strings.Split(cmd, "\n") {
		if len(line) > MaxRunLine {
			return "", -1, fmt.Errorf("run: a line of %d bytes; a shell's line editor takes %d", len(line), MaxRunLine)
		}
	}
	// A line editor acts on control keys (TAB completes, Ctrl-U erases):
	// typed, they would make the shell run another command than cmd.
	if i := strings.IndexFunc(cmd, func(r rune) bool { return r < 0x20 && r != '\n' || r == 0x7f }); i >= 0 {
		return "", -1, fmt.Errorf("run: control character %q in the command (write it with printf's escapes)", cmd[i])
	}
	ctx, cancel := g.talkDeadline(ctx) // one deadline for the command and its retransmissions
	defer cancel()
	var nb [6]byte
	rand.Read(nb[:])
	n := hex.EncodeToString(nb[:])
	what := fmt.Sprintf("run %q", cmd)
	typed := runScript(n, cmd)
	budget := repairBudget
	for try := 1; ; try++ {
		from := g.end()
		if err := g.Send(strings.ReplaceAll(typed, "\n", "\r")); err != nil {
			return "", -1, fmt.Errorf("run: %w", err)
		}
		// Only the lines up to this try's end marker are gathered here,
		// under the conversation's lock; the frames are read after.
		done := runDone(n, try)
		var raw []string
		last, err := g.waitLine(ctx, from, what, func(l console.Line) bool {
			raw = append(raw, l.Raw)
			return strings.Contains(l.Text, done)
		})
		if err != nil {
			return "", -1, err
		}
		g.setPosition(last + 1)
		// As the lines came (Raw: not joined at the firmware's width)
		// and Plain (not Text: a message that broke in between a
		// frame's CR and LF must not overwrite it).
		var lines []string
		for _, l := range raw {
			for _, r := range strings.Split(l, "\n") {
				lines = append(lines, console.Plain(r))
			}
		}
		out, status, perr := parseRun(n, lines, &budget)
		if perr == nil || try > runRetries || errors.Is(perr, errNoFile) || ctx.Err() != nil {
			g.Send(`rm -f "$nbh_f"` + "\r") // kept for a retransmission until now
			if perr != nil {
				return "", status, fmt.Errorf("%s: %w", what, perr)
			}
			return out, status, nil
		}
		// The output arrived damaged: the guest prints its kept copy
		// again; the command does not run again.
		g.lab.tl.Emit(timeline.Event{Source: "console", Kind: "run-retransmit", Guest: g.Name, Msg: what, Detail: map[string]any{"error": perr.Error(), "try": try}})
		typed = fmt.Sprintf("nbh_p %d\n", try+1)
	}
}

// runRetries is how often Run asks the guest to print a command's output
// again when it arrived damaged.
const runRetries = 3

// runScript is what Run types for cmd, with nonce n in its frames: the
// command's output, then a trailer (its status, size and SHA-256), each as
// od's lines of decimal bytes framed by awk as "n:o LINE B B ... =SUM;" and
// "n:t ...", then the end marker twice. The typed text's echo never starts
// a line with the nonce, and the markers as typed differ from the markers
// as printed (printf joins two words).
func runScript(n, cmd string) string {
	frame := func(ch string) string {
		return ` | od -An -v -tu1 | awk -v p=` + n + `:` + ch +
			` '{l=""; s=NF; for (i=1; i<=NF; i++) {l=l " " $i; s=(s*257+$i)%2147483647}; print p " " NR-1 l " =" s ";"}'`
	}
	done := "printf '%s-%s-DONE\\n' NBH-RUN-" + n + ` "$1"`
	return strings.Join([]string{
		// The first folder the shell can write: a network root is often
		// mounted read-only, and then /tmp with it.
		"nbh_s=; nbh_k=; for nbh_d in " + runTmpDirs + "; do nbh_f=$nbh_d/.nbh-run-" + n + `; (: >"$nbh_f") 2>/dev/null && break; nbh_f=; done`,
		// nbh_p prints the kept output and the trailer: again, if the
		// console lost some of it. A folder that filled up while the
		// command wrote cut the kept output short, and checksums of a
		// short copy would check out: "full" instead.
		`nbh_p() { if [ -f "$nbh_f" ] && [ -n "$nbh_s" ] && [ -n "$nbh_k" ]; then`,
		`cat "$nbh_f"` + frame("o"),
		`printf '%s %s %s' "$nbh_s" "$(wc -c <"$nbh_f")" "$(sha256sum <"$nbh_f")"` + frame("t"),
		`elif [ -n "$nbh_s" ] && [ -z "$nbh_k" ]; then printf full` + frame("t"),
		`else printf nofile` + frame("t") + "; fi; " + done + "; " + done + "; }",
		`if [ -n "$nbh_f" ]; then {`,
		cmd,
		// Still room for a byte after the command: its output was kept
		// whole.
		`} >"$nbh_f" 2>&1 </dev/null; nbh_s=$?; printf x 2>/dev/null >"$nbh_f.k" && nbh_k=1; rm -f "$nbh_f.k"; fi; nbh_p 1`,
	}, "\n") + "\n"
}

// runTmpDirs are where Run's script keeps a command's output, the first
// writable one: the user's $TMPDIR, /tmp, and the tmpfs folders a system
// with a read-only root still writes.
const runTmpDirs = "${TMPDIR:-/tmp} /dev/shm /run /var/tmp"

// runDone is the end marker of Run's try (nonce n): each print of the
// output (nbh_p TRY) ends with its own, so a late marker of one print never
// ends the next.
func runDone(n string, try int) string { return fmt.Sprintf("NBH-RUN-%s-%d-DONE", n, try) }

var (
	errNoFile = errors.New("the guest's shell can write none of " + runTmpDirs + " for the output")
	errFull   = errors.New("the guest's folder for the output (the first writable of " + runTmpDirs + ") filled up while the command wrote: its output was cut short")
)

// parseRun reads Run's result (nonce n) from the console lines since it was
// typed: the trailer's status, and the output, checked against the
// trailer's size and SHA-256.
func parseRun(n string, lines []string, budget *int) (string, int, error) {
	streams := readFrames(n, lines, budget)
	trailer, err := streams['t'].bytes()
	if err != nil {
		return "", -1, fmt.Errorf("the trailer: %w", err)
	}
	if string(trailer) == "nofile" {
		return "", -1, errNoFile
	}
	if string(trailer) == "full" {
		return "", -1, errFull
	}
	var status, size int
	var sum string
	if _, err := fmt.Sscanf(string(trailer), "%d %d %64s", &status, &size, &sum); err != nil || len(sum) != 64 {
		return "", -1, fmt.Errorf("a trailer that does not read: %q", trailer)
	}
	out, err := streams['o'].bytes()
	if err != nil {
		return "", status, err
	}
	if len(out) != size {
		return "", status, fmt.Errorf("%d bytes of output arrived, the guest counted %d", len(out), size)
	}
	if got := sha256.Sum256(out); hex.EncodeToString(got[:]) != sum {
		return "", status, fmt.Errorf("the output arrived garbled (%d bytes that do not match the guest's SHA-256)", len(out))
	}
	return string(out), status, nil
}

// frames is one stream's frames by line number.
type frames struct {
	lines map[int][]byte
	err   error
}

// bytes joins the frames, which must be all there.
func (f *frames) bytes() ([]byte, error) {
	if f == nil {
		return nil, nil
	}
	if f.err != nil {
		return nil, f.err
	}
	var out []byte
	for i := range len(f.lines) {
		b, ok := f.lines[i]
		if !ok {
			return nil, fmt.Errorf("line %d of %d did not arrive", i, len(f.lines))
		}
		out = append(out, b...)
	}
	return out, nil
}

// How far repairs of broken frames go: a frame's rest comes within
// continuation console lines (kernel messages in between), it breaks at
// most maxBreaks times, and a Run's repairs together read at most
// repairBudget bytes of candidates (what a guest prints cannot make Run
// slow). No frame is longer than maxFrame: od's 16 bytes, each at most
// " 255", with the nonce, line number and sum.
const (
	continuation = 6
	maxBreaks    = 3
	maxSlack     = 12
	maxFrame     = 160
	repairBudget = 4 << 20
)

// readFrames finds Run's frames in console lines. Something that broke
// into a frame (a kernel message, a service's status line) lasts to the end
// of its console line, such messages ending lines, and the frame goes on
// at the start of a later line: a broken frame is put together from its
// line's head and later lines, at the cuts where its checksum holds.
func readFrames(n string, lines []string, budget *int) map[byte]*frames {
	out := map[byte]*frames{'o': {lines: map[int][]byte{}}, 't': {lines: map[int][]byte{}}}
	used := make([]bool, len(lines))
	for i, l := range lines {
		if used[i] || !strings.HasPrefix(l, n[:1]) {
			continue
		}
		ch, no, data, ok := parseFrame(n, l)
		if !ok {
			// The likeliest repair first: cuts where the grammar
			// breaks (slack: how far short of that they may be, for
			// what broke in starting like a frame's text), and the
			// fewest breaks.
			head := l[:validPrefix(n, l, 0)]
			for slack := 0; slack <= maxSlack && !ok && *budget >= maxFrame; slack++ {
				for breaks := 1; breaks <= maxBreaks && !ok; breaks++ {
					var more []int
					ch, no, data, more, ok = repair(n, lines, used, head, 0, i, breaks, slack, budget)
					for _, j := range more {
						used[j] = true
					}
				}
			}
		}
		if !ok {
			// Not a frame after all, or one broken beyond repair: the
			// line numbers, the size and the SHA-256 tell which.
			continue
		}
		f := out[ch]
		if _, dup := f.lines[no]; dup && f.err == nil {
			f.err = fmt.Errorf("line %d twice", no)
		}
		f.lines[no] = data
	}
	return out
}

// repair completes a broken frame with later lines, in at most breaks more
// pieces, and returns the lines it used. valid is the frame's text so far,
// up to where its grammar broke in its last piece (which ends line at and
// starts after byte from); the cut is tried there first, then up to slack
// bytes short of it (what broke in may start like a frame's text).
func repair(n string, lines []string, used []bool, valid string, from, at, breaks, slack int, budget *int) (byte, int, []byte, []int, bool) {
	for cut := len(valid); cut > from && cut >= len(valid)-slack; cut-- {
		head := valid[:cut]
		for j := at + 1; j < len(lines) && j <= at+continuation; j++ {
			if used[j] {
				continue
			}
			next := lines[j]
			if len(head)+len(next) > maxFrame {
				next = next[:max(maxFrame-len(head), 0)] // no frame is longer
			}
			cand := head + next
			if *budget < len(cand) {
				return 0, 0, nil, nil, false
			}
			*budget -= len(cand)
			if ch, no, data, ok := parseFrame(n, cand); ok {
				return ch, no, data, []int{j}, true
			}
			if breaks > 1 {
				v := cand[:validPrefix(n, cand, len(head))]
				if ch, no, data, more, ok := repair(n, lines, used, v, len(head), j, breaks-1, slack-(len(valid)-cut), budget); ok {
					return ch, no, data, append(more, j), true
				}
			}
		}
	}
	return 0, 0, nil, nil, false
}

// validPrefix is how long a prefix of s can begin a frame of nonce n (at
// most maxFrame), given that its first from bytes can: one pass.
func validPrefix(n, s string, from int) int {
	want := n + ":"
	i := from
	for ; i < len(s) && i < maxFrame; i++ {
		c := s[i]
		if i < len(want) {
			if c != want[i] {
				break
			}
			continue
		}
		if !(c >= '0' && c <= '9' || c == ' ' || c == '=' || c == 'o' || c == 't') {
			break
		}
	}
	return i
}

// parseFrame reads one frame, "n:CH LINE B B ... =SUM;" (text after the
// ";" is not the frame's), and checks its sum.
func parseFrame(n, s string) (ch byte, line int, data []byte, ok bool) {
	rest, found := strings.CutPrefix(s, n+":")
	if !found || len(rest) < 2 || (rest[0] != 'o' && rest[0] != 't') || rest[1] != ' ' {
		return 0, 0, nil, false
	}
	ch = rest[0]
	body, _, found := strings.Cut(rest[2:], ";")
	if !found {
		return 0, 0, nil, false
	}
	fields, sumField, found := strings.Cut(body, " =")
	if !found {
		return 0, 0, nil, false
	}
	words := strings.Split(fields, " ")
	line, err := strconv.Atoi(words[0])
	if err != nil || line < 0 || len(words) > 17 {
		return 0, 0, nil, false
	}
	sum := len(words) - 1
	for _, w := range words[1:] {
		v, err := strconv.Atoi(w)
		if err != nil || v < 0 || v > 255 || len(w) > 3 {
			return 0, 0, nil, false
		}
		data = append(data, byte(v))
		sum = (sum*257 + v) % 2147483647
	}
	if want, err := strconv.Atoi(sumField); err != nil || want != sum {
		return 0, 0, nil, false
	}
	return ch, line, data, true
}

// Login logs in at a getty's prompt on the console: it waits for "login:",
// types user, and password at "Password:" (none when empty), and returns
// once a shell prompt ("#" or "$" at a line's end) shows; a refused login
// is an error.
func (g *Guest) Login(ctx context.Context, user, password string) error {
	ctx, cancel := g.talkDeadline(ctx) // one deadline for the whole login
	defer cancel()
	if _, err := g.Expect(ctx, `(?i)login:\s*$`); err != nil {
		return fmt.Errorf("login: %w", err)
	}
	if err := g.Send(user + "\r"); err != nil {
		return fmt.Errorf("login: %w", err)
	}
	prompt := regexp.MustCompile(`[#$]\s*$`)
	asked := regexp.MustCompile(`(?i)password:\s*$`)
	refused := regexp.MustCompile(`(?i)login incorrect|authentication failure|permission denied`)
	sentPassword := false
	for {
		var line string
		n, err := g.waitLine(ctx, g.position(), "login as "+user, func(l console.Line) bool {
			if prompt.MatchString(l.Text) || refused.MatchString(l.Text) || asked.MatchString(l.Text) && !sentPassword {
				line = l.Text
				return true
			}
			return false
		})
		if err != nil {
			return fmt.Errorf("login: %w", err)
		}
		g.setPosition(n + 1)
		switch {
		case refused.MatchString(line):
			return fmt.Errorf("login as %s: refused: %q", user, line)
		case asked.MatchString(line):
			sentPassword = true
			if err := g.Send(password + "\r"); err != nil {
				return fmt.Errorf("login: %w", err)
			}
		default:
			return nil
		}
	}
}

// Reboot reboots the guest from inside: it types "sync; reboot -f" in the
// shell on its console and returns once the machine reset. The next boot
// begins (Boot counts it; Events, Spans and Verdict are its own); Wait
// returns its verdict.
func (g *Guest) Reboot(ctx context.Context) error {
	return g.restart(ctx, "reboot", func() error { return g.Send("sync; reboot -f\r") })
}

// Reset presses the guest's reset button (QMP system_reset); the next boot
// begins as with Reboot.
func (g *Guest) Reset(ctx context.Context) error {
	return g.restart(ctx, "reset", func() error { return g.proc.SystemReset() })
}

// restart makes QEMU restart the machine on its next reset (it otherwise
// exits, -no-reboot), triggers one, and starts the next boot when it comes.
func (g *Guest) restart(ctx context.Context, how string, trigger func() error) error {
	if g.proc == nil {
		return fmt.Errorf("%s: %w", how, errNotStarted)
	}
	if g.closed() {
		return fmt.Errorf("%s: %w", how, errClosed)
	}
	ctx, cancel := g.talkDeadline(ctx)
	defer cancel()
	g.restartMu.Lock() // one restart at a time
	defer g.restartMu.Unlock()
	if g.settle != nil {
		g.settle.Stop() // an earlier reset's return to -no-reboot: not now
	}
	drainResets(g.proc.Resets()) // not ours
	if err := g.proc.SetRebootAction(true); err != nil {
		return fmt.Errorf("%s: %w", how, err)
	}
	if err := trigger(); err != nil {
		g.proc.SetRebootAction(false)
		return fmt.Errorf("%s: %w", how, err)
	}
	select {
	case at := <-g.proc.Resets():
		b := g.newBoot(at)
		g.talk.from(at) // the conversation goes on with the new boot's lines
		if g.espPeer != nil {
			g.espPeer.In.RestartReplay() // the rebooted kernel counts from 1 again
		}
		g.lab.tl.Emit(timeline.Event{Source: "qemu", Kind: how, Guest: g.Name, Boot: b.id, Stage: timeline.Firmware, Time: at,
			Msg: fmt.Sprintf("boot %d of %s", b.id, g.Name)})
		go b.j.Watch(b.ctx)
		// Back to ending QEMU on a reset, a moment after this one: a
		// boot that resets on its own (panic=-1) must end, not boot
		// again unobserved. Not at once: a kernel tries its ways to
		// reset one after the other (ACPI, the keyboard controller),
		// and the machine takes a later one too.
		g.settle = time.AfterFunc(resetSettle, func() {
			g.restartMu.Lock()
			defer g.restartMu.Unlock()
			g.proc.SetRebootAction(false)
			drainResets(g.proc.Resets()) // the same reset, asked again
		})
		return nil
	case <-g.proc.Exited():
		return g.talkError(how, "QEMU exited instead of resetting")
	case <-ctx.Done():
		g.proc.SetRebootAction(false)
		return g.talkError(how, "no reset: "+ctx.Err().Error())
	}
}

// drainResets empties the channel of resets without waiting.
func drainResets(ch <-chan time.Time) {
	for {
		select {
		case <-ch:
		default:
			return
		}
	}
}

// from moves the position to the first line heard at or after t (a new
// boot's first), or past every line heard so far.
func (t *talk) from(at time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	pos := t.base + len(t.lines)
	for i := len(t.lines) - 1; i >= 0 && !t.lines[i].Time.Before(at); i-- {
		pos = t.base + i
	}
	t.pos = max(t.pos, pos)
}

// resetSettle is how long after a reset the machine still restarts on
// another.
const resetSettle = 5 * time.Second

// PowerOff powers the guest off from inside ("sync; poweroff -f" in the
// shell on its console) and returns once QEMU exited. The current boot's
// verdict stays as it was (a boot still under way ends as stopped).
func (g *Guest) PowerOff(ctx context.Context) error {
	if g.proc == nil {
		return fmt.Errorf("power off: %w", errNotStarted)
	}
	ctx, cancel := g.talkDeadline(ctx)
	defer cancel()
	if err := g.Send("sync; poweroff -f\r"); err != nil {
		return fmt.Errorf("power off: %w", err)
	}
	select {
	case <-g.proc.Exited():
		return nil
	case <-ctx.Done():
		return g.talkError("power off", "QEMU still runs: "+ctx.Err().Error())
	}
}
