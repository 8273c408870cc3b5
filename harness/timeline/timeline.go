// Package timeline is the lab's single record of what happened: every service,
// console, fault and QEMU event, with its time. Reports, stage attribution and
// assertions read the timeline; nothing parses logs twice.
package timeline

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Stage is how far a boot got. Stages are ordered.
type Stage int

const (
	None     Stage = iota
	Firmware       // QEMU started, firmware running
	DHCP           // the guest asked for an address
	Loader         // a boot file (loader, script, config) was fetched
	Kernel         // the kernel started
	Init           // the archive's init runs
	Root           // the init works on the root file system
	Marker         // the expected marker was printed
)

var stageNames = []string{"none", "firmware", "dhcp", "loader", "kernel", "init", "root", "marker"}

func (s Stage) String() string {
	if s < 0 || int(s) >= len(stageNames) {
		return fmt.Sprintf("stage(%d)", int(s))
	}
	return stageNames[s]
}

// MarshalText writes the stage by name in JSON.
func (s Stage) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText reads a stage name.
func (s *Stage) UnmarshalText(b []byte) error {
	for i, n := range stageNames {
		if n == string(b) {
			*s = Stage(i)
			return nil
		}
	}
	return fmt.Errorf("unknown stage %q", b)
}

// Event is one observation.
type Event struct {
	Time   time.Time      `json:"time"`
	Source string         `json:"source"`          // dhcp, tftp, http, console, fault, qemu, netfab
	Kind   string         `json:"kind"`            // what happened, e.g. "offer", "transfer", "stage"
	Guest  string         `json:"guest,omitempty"` // guest name, when the lab knows it
	Boot   int            `json:"boot,omitempty"`  // which boot of the guest (1, 2, ...; NewBoot)
	MAC    string         `json:"mac,omitempty"`   // guest NIC, for network events
	Addr   string         `json:"addr,omitempty"`  // guest IP address, for network events
	Stage  Stage          `json:"stage,omitempty"` // the stage this event starts, if any
	Msg    string         `json:"msg,omitempty"`
	Detail map[string]any `json:"detail,omitempty"`
}

// Timeline collects events; it is safe for concurrent use.
type Timeline struct {
	mu     sync.Mutex
	events []Event
	subs   []subscriber
	nextID int
	names  map[string]string // MAC or IP address -> guest name
	boots  map[string]int    // guest name -> its current boot
	stager atomic.Pointer[func(Event) Stage]
}

// New returns an empty timeline.
func New() *Timeline {
	return &Timeline{names: map[string]string{}, boots: map[string]int{}}
}

// NewBoot starts the next boot of guest and returns its number (1 for the
// first): every later event of the guest belongs to it, until the next.
// A guest booted again under its name, or reset, is a new boot.
func (t *Timeline) NewBoot(guest string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.boots[guest]++
	return t.boots[guest]
}

// Forget drops guest's events and its addresses' names (keys: its MAC and
// IP addresses): a long-lived lab's closed guest, whose events were written
// out.
func (t *Timeline) Forget(guest string, keys ...string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.events = slices.DeleteFunc(t.events, func(e Event) bool { return e.Guest == guest })
	t.events = slices.Clip(t.events)
	for _, k := range keys {
		if k != "" && t.names[strings.ToLower(k)] == guest {
			delete(t.names, strings.ToLower(k))
		}
	}
	delete(t.boots, guest)
}

// CurrentBoot is guest's current boot (0 before its first).
func (t *Timeline) CurrentBoot(guest string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.boots[guest]
}

// Name ties a guest NIC's MAC or IP address to its guest name, so network
// events carry it.
func (t *Timeline) Name(key, guest string) {
	t.mu.Lock()
	t.names[strings.ToLower(key)] = guest
	t.mu.Unlock()
}

// SetStager makes f decide the stage of every later event that names
// none: services say what happened (a fetch, a login, a mount), and the lab
// says which stage of a boot that means. f must not block or emit.
func (t *Timeline) SetStager(f func(Event) Stage) { t.stager.Store(&f) }

// Emit records e (stamping the time if unset) and tells subscribers.
func (t *Timeline) Emit(e Event) {
	if t == nil {
		return
	}
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	if f := t.stager.Load(); f != nil && e.Stage == None {
		e.Stage = (*f)(e)
	}
	// The timeline's own copy: an emitter that goes on filling its
	// detail map for a later event (HTTP's request, then its transfer)
	// must not change, or race with readers of, this one.
	e.Detail = maps.Clone(e.Detail)
	t.mu.Lock()
	t.resolve(&e)
	t.events = append(t.events, e)
	subs := slices.Clone(t.subs)
	t.mu.Unlock()
	for _, s := range subs {
		s.f(e)
	}
}

// resolve names the guest of e by its MAC or address, and its current
// boot, where e does not say. Called with mu held.
func (t *Timeline) resolve(e *Event) {
	if e.Guest == "" && e.MAC != "" {
		e.Guest = t.names[strings.ToLower(e.MAC)]
	}
	if e.Guest == "" && e.Addr != "" {
		e.Guest = t.names[e.Addr]
	}
	if e.Guest != "" && e.Boot == 0 {
		e.Boot = t.boots[e.Guest]
	}
}

// Subscribe calls f for every later event, on the emitting goroutine (f
// must not block), until the returned function is called.
func (t *Timeline) Subscribe(f func(Event)) (unsubscribe func()) {
	t.mu.Lock()
	t.nextID++
	id := t.nextID
	t.subs = append(t.subs, subscriber{id, f})
	t.mu.Unlock()
	return func() {
		t.mu.Lock()
		t.subs = slices.DeleteFunc(t.subs, func(s subscriber) bool { return s.id == id })
		t.mu.Unlock()
	}
}

type subscriber struct {
	id int
	f  func(Event)
}

// Subscribers is how many subscriptions are live (a long-lived lab's
// check that closed guests leave none behind).
func (t *Timeline) Subscribers() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.subs)
}

// Events returns the events of guest (and the lab-wide ones when guest is
// empty: all of them).
func (t *Timeline) Events(guest string) []Event {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []Event
	for _, e := range t.events {
		if guest == "" || e.Guest == guest {
			out = append(out, e)
		}
	}
	return out
}

// BootEvents returns the events of one boot of guest.
func (t *Timeline) BootEvents(guest string, boot int) []Event {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []Event
	for _, e := range t.events {
		if e.Guest == guest && e.Boot == boot {
			out = append(out, e)
		}
	}
	return out
}

// WriteJSONL writes events as one JSON object per line.
func WriteJSONL(w io.Writer, events []Event) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	for _, e := range events {
		if err := enc.Encode(e); err != nil {
			return err
		}
	}
	return nil
}

// Span is the time spent in one stage.
type Span struct {
	Stage    Stage
	Start    time.Time
	Duration time.Duration // until the next stage started (or end)
}

// Spans derives per-stage durations from events: a stage starts with the
// first event, in time order, that goes past every stage before it (DHCP
// done by an init after the kernel started is not the DHCP stage). end
// closes the last span.
func Spans(events []Event, end time.Time) []Span {
	evs := slices.Clone(events)
	sort.SliceStable(evs, func(i, j int) bool { return evs[i].Time.Before(evs[j].Time) })
	var spans []Span
	cur := None
	for _, e := range evs {
		if e.Stage > cur {
			cur = e.Stage
			spans = append(spans, Span{Stage: e.Stage, Start: e.Time})
		}
	}
	for i := range spans {
		next := end
		if i+1 < len(spans) {
			next = spans[i+1].Start
		}
		if d := next.Sub(spans[i].Start); d > 0 {
			spans[i].Duration = d
		}
	}
	return spans
}

// Reached is the furthest stage among events.
func Reached(events []Event) Stage {
	s := None
	for _, e := range events {
		if e.Stage > s {
			s = e.Stage
		}
	}
	return s
}

// Table formats spans as an aligned table relative to start.
func Table(spans []Span, start time.Time) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%-9s %9s %9s\n", "stage", "at", "took")
	for _, s := range spans {
		took := fmt.Sprintf("%.2fs", s.Duration.Seconds())
		if s.Stage == Marker {
			took = "-"
		}
		fmt.Fprintf(&b, "%-9s %8.2fs %9s\n", s.Stage, s.Start.Sub(start).Seconds(), took)
	}
	return b.String()
}

// ProgressKind is the kind of a Meter's events.
const ProgressKind = "progress"

// Meter reports the bytes of one transfer as "progress" events: the first
// bytes at once, then at most one event a second, and the last count within
// a second of the last bytes, so a slow download shows it is moving and a
// stalled one shows where it stopped. Detail carries "bytes" (so far), "of"
// (the size, 0 if unknown) and "open" (a file transfer that has an end: the
// service's later event closes it).
type Meter struct {
	tl    *Timeline
	base  Event
	every time.Duration

	mu      sync.Mutex
	n       int64
	last    time.Time
	shown   int64
	pending bool // a report of the latest count is due
	closed  bool
}

// Meter starts a meter whose events are base (Source, Addr or Guest, and
// the file or export as Msg) with the progress details. Its events belong
// to the guest and boot of the transfer's start: a report due when the
// guest resets is no event of the next boot.
func (t *Timeline) Meter(base Event, size int64, open bool) *Meter {
	base.Kind = ProgressKind
	t.mu.Lock()
	t.resolve(&base)
	t.mu.Unlock()
	d := map[string]any{"of": size, "open": open}
	for k, v := range base.Detail {
		d[k] = v
	}
	base.Detail = d
	return &Meter{tl: t, base: base, every: time.Second}
}

// Add counts n more bytes moved.
func (m *Meter) Add(n int) {
	if m == nil || n <= 0 {
		return
	}
	// mu is held while reporting, so that no report of a count comes
	// after Close has returned.
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return
	}
	m.n += int64(n)
	now := time.Now()
	if wait := m.every - now.Sub(m.last); !m.last.IsZero() && wait > 0 {
		if !m.pending {
			m.pending = true
			time.AfterFunc(wait, m.flush)
		}
		return
	}
	m.report(now)
}

// Close ends the meter before the service reports how the transfer ended:
// the latest count is reported now if it was not, and nothing after.
func (m *Meter) Close() {
	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.closed && m.n != m.shown {
		m.report(time.Now())
	}
	m.closed = true
}

// flush reports the latest count, if it was not.
func (m *Meter) flush() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pending = false
	if !m.closed && m.n != m.shown {
		m.report(time.Now())
	}
}

// report puts the count now on the timeline. Called with mu held.
func (m *Meter) report(now time.Time) {
	m.last, m.shown = now, m.n
	e := m.base
	e.Time = now
	e.Detail = maps.Clone(m.base.Detail)
	e.Detail["bytes"] = m.n
	m.tl.Emit(e)
}
