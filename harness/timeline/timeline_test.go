package timeline

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"
)

func TestSpansFollowTimeNotStageNumbers(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	evs := []Event{
		{Time: at(0), Stage: Firmware},
		{Time: at(2), Stage: Kernel},
		{Time: at(3.5), Stage: Init},
		{Time: at(3.6), Stage: DHCP}, // the init's own DHCP: not the DHCP stage
		{Time: at(4), Stage: Marker},
	}
	spans := Spans(evs, at(5))
	var got []Stage
	for _, s := range spans {
		got = append(got, s.Stage)
	}
	assert.DeepEqual(t, got, []Stage{Firmware, Kernel, Init, Marker})
	assert.Equal(t, spans[0].Duration, 2*time.Second)
	assert.Equal(t, spans[2].Duration, 500*time.Millisecond)
	assert.Equal(t, Reached(evs), Marker)
	assert.Assert(t, strings.Contains(Table(spans, t0), "kernel        2.00s     1.50s"), Table(spans, t0))
}

func TestGuestNamesAndJSON(t *testing.T) {
	tl := New()
	tl.Name("52:54:00:4e:42:01", "g1")
	tl.Name("10.0.2.15", "g1")
	tl.Emit(Event{Source: "dhcp", Kind: "discover", MAC: "52:54:00:4E:42:01", Stage: DHCP})
	tl.Emit(Event{Source: "http", Kind: "request", Addr: "10.0.2.15", Stage: Loader})
	tl.Emit(Event{Source: "http", Kind: "request", Addr: "10.0.2.99"})
	assert.Equal(t, len(tl.Events("g1")), 2)
	var buf bytes.Buffer
	assert.NilError(t, WriteJSONL(&buf, tl.Events("g1")))
	var e Event
	assert.NilError(t, json.Unmarshal(bytes.Split(buf.Bytes(), []byte("\n"))[1], &e))
	assert.Equal(t, e.Stage, Loader)
	assert.Equal(t, e.Guest, "g1")
}

// TestMeter: a transfer's first bytes are reported at once, then at most one
// event a second, each with the bytes so far, and the last count follows
// within the second.
func TestMeter(t *testing.T) {
	tl := New()
	m := tl.Meter(Event{Source: "tftp", Guest: "g1", Msg: "g1/initrd"}, 3000, true)
	m.every = 300 * time.Millisecond
	m.Add(1000)
	m.Add(1000) // within the period: not reported yet
	evs := tl.Events("g1")
	if len(evs) != 1 || evs[0].Kind != ProgressKind || evs[0].Detail["bytes"] != int64(1000) || evs[0].Detail["of"] != int64(3000) || evs[0].Detail["open"] != true {
		t.Fatalf("after two adds: %+v", evs)
	}
	m.Add(1000)
	time.Sleep(600 * time.Millisecond) // the period ends: the last count is reported, once
	evs = tl.Events("g1")
	if len(evs) != 2 || evs[1].Detail["bytes"] != int64(3000) {
		t.Fatalf("after the period: %+v", evs)
	}
	// Closed: the count is reported at once, and nothing after (the
	// service's end of the transfer comes last).
	m.Add(500)
	m.Close()
	m.Add(500)
	time.Sleep(600 * time.Millisecond)
	evs = tl.Events("g1")
	if len(evs) != 3 || evs[2].Detail["bytes"] != int64(3500) {
		t.Fatalf("after Close: %+v", evs)
	}
	var nilMeter *Meter
	nilMeter.Add(5) // a transfer without a meter
	nilMeter.Close()
}
