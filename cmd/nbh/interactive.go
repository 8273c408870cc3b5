package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/term"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/matrix"
)

// escapeKey starts a command in an interactive session: Ctrl-].
const escapeKey = 0x1d

const escapeHelp = "Ctrl-] q quits (stops the guest), Ctrl-] d detaches (the boot goes on to its verdict without the terminal), Ctrl-] Ctrl-] sends Ctrl-]"

// crlf writes text to a terminal in raw mode: every newline a CR LF.
type crlf struct {
	mu sync.Mutex
	w  io.Writer
}

func (c *crlf) printf(format string, a ...any) {
	c.Write([]byte(fmt.Sprintf(format, a...)))
}

func (c *crlf) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	io.WriteString(c.w, strings.ReplaceAll(string(b), "\n", "\r\n"))
	return len(b), nil
}

// interactiveBoot boots spec with the terminal as the guest's serial
// console: raw mode, keys to the guest, the guest's output as it comes,
// timeline events on stderr as they happen. The lab keeps serving after the
// verdict until the user quits. The terminal is restored however it ends.
func interactiveBoot(ctx context.Context, opts harness.Options, spec harness.Spec) (harness.Verdict, []timeline.Span, time.Time, error) {
	in := int(os.Stdin.Fd())
	if !term.IsTerminal(in) {
		return harness.Verdict{}, nil, time.Time{}, fmt.Errorf("--interactive needs a terminal on standard input")
	}
	errw := &crlf{w: os.Stderr}
	if opts.Log != nil {
		opts.Log = errw
	}
	start := time.Now()
	spec.OnStage = nil // the events below say it
	spec.OnEvent = func(e timeline.Event) {
		if e.Source == "console" && e.Kind == "responded" {
			return
		}
		msg := e.Msg
		if len(msg) > 100 {
			msg = msg[:97] + "..."
		}
		errw.printf("\n\x1b[2m[nbh %6.2fs] %s %s: %s\x1b[0m\n", time.Since(start).Seconds(), e.Source, e.Kind, msg)
	}
	fmt.Fprintf(os.Stderr, "nbh: interactive console: %s\n", escapeHelp)
	old, err := term.MakeRaw(in)
	if err != nil {
		return harness.Verdict{}, nil, time.Time{}, fmt.Errorf("--interactive: %w", err)
	}
	defer term.Restore(in, old)

	keys := make(chan []byte)
	go func() {
		// Reads stdin until the process ends; a detached session stops
		// using what it reads.
		for {
			b := make([]byte, 256)
			n, err := os.Stdin.Read(b)
			if err != nil {
				close(keys)
				return
			}
			keys <- b[:n]
		}
	}()

	return matrix.BootWith(ctx, opts, spec, func(g *harness.Guest) harness.Verdict {
		g.Attach(os.Stdout)
		defer g.Attach(nil)
		waitCtx, stopWait := context.WithCancel(ctx)
		defer stopWait()
		verdict := make(chan harness.Verdict, 1)
		go func() { verdict <- g.Wait(waitCtx) }()
		var v *harness.Verdict
		exited := g.Process().Exited()
		escaped := false
		for {
			select {
			case got := <-verdict:
				v = &got
				verdict = nil
				if got.OK {
					errw.printf("\n\x1b[1mnbh: OK: marker after %.2fs; the lab keeps serving: Ctrl-] q quits\x1b[0m\n", got.Elapsed.Seconds())
				} else {
					errw.printf("\n\x1b[1mnbh: FAILED: %v\nnbh: the lab keeps serving, the guest keeps running: Ctrl-] q quits\x1b[0m\n", got.Err())
				}
			case <-exited:
				exited = nil
				errw.printf("\n\x1b[1mnbh: the guest's QEMU exited; Ctrl-] q quits\x1b[0m\n")
			case <-ctx.Done():
				return finish(v, stopWait, verdict)
			case b, ok := <-keys:
				if !ok {
					return finish(v, stopWait, verdict)
				}
				var send []byte
				for _, c := range b {
					switch {
					case escaped:
						escaped = false
						switch c {
						case 'q', 'Q', '.':
							return finish(v, stopWait, verdict)
						case 'd', 'D':
							g.Attach(nil)
							term.Restore(in, old)
							fmt.Fprintf(os.Stderr, "\nnbh: detached; the boot goes on to its verdict\n")
							if v != nil {
								return *v
							}
							return <-verdict
						case escapeKey:
							send = append(send, escapeKey)
						default:
							errw.printf("\n\x1b[1mnbh: %s\x1b[0m\n", escapeHelp)
						}
					case c == escapeKey:
						escaped = true
					default:
						send = append(send, c)
					}
				}
				if len(send) > 0 {
					g.Send(string(send))
				}
			}
		}
	})
}

// finish ends a session the user quit: the verdict if there was one, else
// the boot ends as interrupted.
func finish(v *harness.Verdict, stopWait func(), verdict <-chan harness.Verdict) harness.Verdict {
	if v != nil {
		return *v
	}
	stopWait()
	return <-verdict
}
