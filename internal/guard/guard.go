// Package guard keeps one bad input from taking the lab down: a goroutine
// that serves one guest's connection, packet or transfer and panics is
// recovered, reported with its stack, and ends alone; the process, the
// other guests and the other services go on.
package guard

import (
	"fmt"
	"runtime/debug"
)

// Report hears a recovered panic: what was being served, the panic's value
// and the goroutine's stack.
type Report func(what string, v any, stack []byte)

// Recover, deferred directly at the top of such a goroutine (defer
// guard.Recover(...)), turns its panic into a call of report (nil: none).
func Recover(what string, report Report) {
	v := recover()
	if v == nil {
		return
	}
	if report != nil {
		report(what, v, debug.Stack())
	}
}

// Run calls f, turning its panic into a report; it returns whether f
// ended normally.
func Run(what string, report Report, f func()) (ok bool) {
	defer Recover(what, report)
	f()
	return true
}

// Message is a report as one line: the panic and where it was raised.
func Message(what string, v any) string {
	return fmt.Sprintf("recovered from a panic serving %s: %v", what, v)
}
