// Package console owns a guest's serial console: a pseudo-terminal from
// go-expect that QEMU's serial port writes to, drained continuously (a guest
// is never blocked by a full terminal buffer, whoever is waiting), teed to
// console.log with a timestamp on every line, and turned into lines that the
// lab checks against the marker and the failure table.
//
// Two bugs seen in other harnesses are designed out here: expectations that
// block after the guest exits (the console drops its own copy of the terminal
// once QEMU has it, so QEMU's exit ends the stream), and floods of output
// that stall matching (lines are matched one at a time, bounded in length).
package console

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	expect "github.com/Netflix/go-expect"
)

// MaxLine bounds a line; longer runs without a newline are split.
const MaxLine = 4096

// idle is how long a partial line (a prompt) may wait before it is handed on.
const idle = 100 * time.Millisecond

// Line is one console line.
type Line struct {
	Time    time.Time
	Text    string // printable text: no CR, no terminal escapes (a CR's overwrite applied)
	Raw     string // the bytes as they came, without the line's end (a wrapped line's break kept)
	Partial bool   // no newline yet (a prompt, or output that paused)
	// Replayed: the line is a restored machine's output from before its
	// state was saved (StartedAfter), not something it says now: nothing
	// answers it.
	Replayed bool
}

// Console is a running serial console.
type Console struct {
	c     *expect.Console
	start time.Time
	log   io.Writer
	lines chan Line
	done  chan struct{}

	mu   sync.Mutex
	tail []string

	sendMu  sync.Mutex
	pending chan struct{} // a Send the guest has not taken yet

	mirror mirror
}

// mirror is where the raw console stream is copied as it arrives, rune by
// rune (an interactive session); nowhere until Mirror is called.
type mirror struct {
	mu   sync.Mutex
	w    io.Writer
	keep *bytes.Buffer // the stream so far (KeepRaw), up to maxKept
}

// maxKept bounds the stream KeepRaw keeps: a firmware's output up to its
// first request on the network is a few KiB.
const maxKept = 1 << 20

func (m *mirror) Write(b []byte) (int, error) {
	m.mu.Lock()
	w := m.w
	if m.keep != nil && m.keep.Len() < maxKept {
		m.keep.Write(b[:min(len(b), maxKept-m.keep.Len())])
	}
	m.mu.Unlock()
	if w != nil {
		w.Write(b) // a slow or gone terminal must not stop the console
	}
	return len(b), nil
}

// New opens a console; log (may be nil) receives the timestamped transcript.
// Lines arrive on Lines() until the guest side closes.
func New(log io.Writer, start time.Time) (*Console, error) {
	con := &Console{start: start, log: log, lines: make(chan Line, 1024), done: make(chan struct{})}
	c, err := expect.NewConsole(expect.WithStdout(&con.mirror))
	if err != nil {
		return nil, fmt.Errorf("console: %w", err)
	}
	con.c = c
	return con, nil
}

// Tty is the terminal QEMU's serial port is attached to (its stdin/stdout).
func (con *Console) Tty() *os.File { return con.c.Tty() }

// Started tells the console that QEMU holds the terminal: the console closes
// its own copy, so that QEMU exiting ends the stream, and begins reading.
func (con *Console) Started() {
	con.c.Tty().Close()
	go con.read("")
}

// StartedAfter is Started for a machine restored from a saved state: what
// its console showed before the state was saved (Raw of the machine that
// saved it, at most MaxReplay bytes of it) comes first, as lines marked
// Replayed, and the guest's own output follows. The replay goes straight
// to the reader, not through the terminal (which would add carriage
// returns), and never waits for anyone to take its lines.
func (con *Console) StartedAfter(before []byte) {
	con.c.Tty().Close()
	if len(before) > MaxReplay {
		before = before[len(before)-MaxReplay:]
	}
	go con.read(string(before))
}

// MaxReplay bounds what StartedAfter replays.
const MaxReplay = maxKept

// KeepRaw makes the console keep its raw stream (up to 1 MiB), for Raw.
func (con *Console) KeepRaw() {
	con.mirror.mu.Lock()
	con.mirror.keep = new(bytes.Buffer)
	con.mirror.mu.Unlock()
}

// Raw is the raw stream read so far, since KeepRaw.
func (con *Console) Raw() []byte {
	con.mirror.mu.Lock()
	defer con.mirror.mu.Unlock()
	if con.mirror.keep == nil {
		return nil
	}
	return bytes.Clone(con.mirror.keep.Bytes())
}

// Lines delivers console lines; it is closed when the stream ends.
func (con *Console) Lines() <-chan Line { return con.lines }

// Done is closed when the stream has ended and every line was delivered.
func (con *Console) Done() <-chan struct{} { return con.done }

// ErrNotReading is typing the guest does not take: its serial port reads
// nothing (a hung or busy guest, a firmware that polls no input), so the
// terminal's buffers are full.
var ErrNotReading = errors.New("the guest does not read its console")

// sendTimeout bounds how long Send waits for the guest to take what it
// types (a variable for the tests).
var sendTimeout = 10 * time.Second

// Send types s on the console. It returns ErrNotReading when the guest has
// not taken it within a few seconds; the bytes still go in if it ever
// reads again, and until then every Send fails at once.
func (con *Console) Send(s string) error {
	con.sendMu.Lock()
	defer con.sendMu.Unlock()
	if con.pending != nil {
		select {
		case <-con.pending:
			con.pending = nil
		default:
			return fmt.Errorf("%w: what was typed before is still waiting", ErrNotReading)
		}
	}
	// A write to the terminal blocks while its buffers are full and
	// cannot be cancelled: it goes on in its own goroutine, which ends
	// when the guest reads or the console closes.
	done := make(chan struct{})
	var err error
	go func() {
		defer close(done)
		_, err = con.c.Send(s)
	}()
	t := time.NewTimer(sendTimeout)
	defer t.Stop()
	select {
	case <-done:
		return err
	case <-t.C:
		con.pending = done
		return fmt.Errorf("%w: %d bytes not taken in %s", ErrNotReading, len(s), sendTimeout)
	}
}

// Mirror copies the raw console stream to w from now on, as it arrives (nil
// stops it): an interactive session's terminal.
func (con *Console) Mirror(w io.Writer) {
	con.mirror.mu.Lock()
	con.mirror.w = w
	con.mirror.mu.Unlock()
}

// Close releases the terminal.
func (con *Console) Close() error { return con.c.Close() }

// Tail returns the last n lines seen.
func (con *Console) Tail(n int) []string {
	con.mu.Lock()
	defer con.mu.Unlock()
	if len(con.tail) < n {
		n = len(con.tail)
	}
	return append([]string(nil), con.tail[len(con.tail)-n:]...)
}

// lineEnd matches as soon as the buffer ends a line or grows too long: it
// looks at the last byte only, so matching stays cheap however long the
// output.
type lineEnd struct{}

func (lineEnd) Match(v any) bool {
	buf, ok := v.(*bytes.Buffer)
	if !ok {
		return false
	}
	b := buf.Bytes()
	return len(b) > 0 && (b[len(b)-1] == '\n' || len(b) >= MaxLine)
}

func (lineEnd) Criteria() any { return "end of line" }

func untilLineEnd(opts *expect.ExpectOpts) error {
	opts.Matchers = append(opts.Matchers, lineEnd{})
	return nil
}

// WrapWidth is the width at which firmware text consoles (SeaBIOS's serial
// console, and the iPXE ROM writing through it) wrap lines: a line of
// exactly this many characters is joined with the next, so an error message
// and its error code stay on one line for the classifier.
const WrapWidth = 80

func (con *Console) read(replay string) {
	defer close(con.done)
	defer close(con.lines)
	// held is a line that filled the firmware console's width, joined
	// with the next; heldRaw keeps it as it came, line break included.
	var held, heldRaw string
	replaying := false
	take := func(s string, partial bool) {
		if s != "" && !partial && len(Clean(s)) == WrapWidth {
			held += strings.TrimRight(s, "\r\n")
			heldRaw += s
			return
		}
		raw := s
		if held != "" && (s != "" || partial) {
			s, raw, held, heldRaw = held+s, heldRaw+s, "", ""
		}
		if s != "" {
			con.emit(s, raw, partial, replaying)
		}
	}
	if replay != "" {
		con.mirror.Write([]byte(replay))
		replaying = true
		pieces := strings.SplitAfter(replay, "\n")
		for i, p := range pieces {
			if p != "" {
				// The last line, cut by the save, goes on in the guest's
				// own output: shown split, as a pause would.
				take(p, i == len(pieces)-1 && !strings.HasSuffix(p, "\n"))
			}
		}
		replaying = false
	}
	for {
		s, err := con.c.Expect(untilLineEnd, expect.WithTimeout(idle))
		partial := err != nil
		// One read can bring several lines: each is a line of its own.
		pieces := strings.SplitAfter(s, "\n")
		for i, p := range pieces {
			if p != "" || i == 0 {
				take(p, partial && i == len(pieces)-1)
			}
		}
		if err != nil && !isTimeout(err) {
			return // QEMU closed the terminal: EOF or EIO
		}
	}
}

func isTimeout(err error) bool {
	var t interface{ Timeout() bool }
	return errors.As(err, &t) && t.Timeout()
}

// emit hands on a line: joined (firmware wrapping undone) and as it came.
func (con *Console) emit(joined, raw string, partial, replayed bool) {
	now := time.Now()
	text := Clean(joined)
	if con.log != nil {
		fmt.Fprintf(con.log, "[%8.3f] %s", now.Sub(con.start).Seconds(), strings.TrimRight(joined, "\r\n"))
		if partial {
			io.WriteString(con.log, " ⏎\n") // the line went on later; shown split
		} else {
			io.WriteString(con.log, "\n")
		}
	}
	if strings.TrimSpace(text) == "" {
		return
	}
	con.mu.Lock()
	con.tail = append(con.tail, text)
	if len(con.tail) > 200 {
		con.tail = con.tail[len(con.tail)-100:]
	}
	con.mu.Unlock()
	con.lines <- Line{Time: now, Text: text, Raw: strings.TrimRight(raw, "\r\n"), Partial: partial, Replayed: replayed}
}

var escapes = regexp.MustCompile(`\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[@-Z\\-_])`)

// Plain strips terminal escapes and control bytes (carriage returns
// included) and keeps every printable byte: what was sent, where Clean is
// what a terminal would show.
func Plain(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 && r != '\t' || r == 0x7f {
			return -1
		}
		return r
	}, escapes.ReplaceAllString(s, ""))
}

// Clean strips terminal escapes, carriage returns and other control bytes,
// and bytes that are not UTF-8 (most of the code page 437 box EDK2's
// terminal draws shim's dialogs with).
func Clean(s string) string {
	s = escapes.ReplaceAllString(s, "")
	// A carriage return in the middle of a line overwrote what came before
	// on a terminal; keep the last non-empty rewrite.
	s = strings.TrimRight(s, "\r\n")
	if i := strings.LastIndex(s, "\r"); i >= 0 {
		if rest := s[i+1:]; strings.TrimSpace(rest) != "" {
			s = rest
		} else {
			s = strings.ReplaceAll(s, "\r", "")
		}
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 && r != '\t' || r == 0x7f || r == utf8.RuneError {
			return -1
		}
		return r
	}, s)
}
