package guard

import (
	"strings"
	"testing"
)

func TestRecoverReportsAndEndsAlone(t *testing.T) {
	var got string
	var stack []byte
	report := func(what string, v any, s []byte) { got, stack = Message(what, v), s }
	ok := Run("tftp 10.0.2.15:1234", report, func() {
		var b []byte
		_ = b[13] // a bounds panic, as a short packet would cause
	})
	if ok {
		t.Fatal("Run said a panicking function ended normally")
	}
	if !strings.Contains(got, "serving tftp 10.0.2.15:1234: runtime error: index out of range") {
		t.Fatalf("report %q", got)
	}
	if !strings.Contains(string(stack), "guard_test.go") {
		t.Fatalf("the stack does not show where: %s", stack)
	}
	if !Run("x", nil, func() {}) {
		t.Fatal("a normal return reported as a panic")
	}
	Run("x", nil, func() { panic("no reporter") }) // must not crash
}
