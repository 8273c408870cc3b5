package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"testing"
	"time"

	"gotest.tools/v3/assert"
)

// fakeQMP is a QMP peer that does what QEMU may: an event before the
// greeting, an event between the capabilities command and its reply (a
// stream netdev's NETDEV_STREAM_CONNECTED comes right then), a reply with
// no id, and replies in another order than the commands. Each command's
// reply names the command's own id, which is the oracle.
func fakeQMP(t *testing.T, hold chan string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", path)
	assert.NilError(t, err)
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		send := func(s string) { fmt.Fprintln(c, s) }
		event := `{"timestamp": {"seconds": 1796311633, "microseconds": 101869}, "event": "NETDEV_STREAM_CONNECTED", "data": {"netdev-id": "n0"}}`
		send(event)
		send(`{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}`)
		sc := bufio.NewScanner(c)
		var held []string
		for sc.Scan() {
			var req struct {
				Execute string          `json:"execute"`
				ID      json.RawMessage `json:"id"`
			}
			if json.Unmarshal(sc.Bytes(), &req) != nil {
				continue
			}
			switch req.Execute {
			case "qmp_capabilities":
				send(event)
				send(`{"return": {}}`) // no id: must not be taken for anything
				send(fmt.Sprintf(`{"return": {}, "id": %s}`, req.ID))
			case "hold":
				// Answered only after the next command, and then
				// given up on by its caller already.
				held = append(held, string(req.ID))
				hold <- string(req.ID)
			case "query-status":
				send(event)
				send(fmt.Sprintf(`{"return": {"status": "running", "for": %s}, "id": %s}`, req.ID, req.ID))
				for _, id := range held {
					send(fmt.Sprintf(`{"return": {"status": "late", "for": %s}, "id": %s}`, id, id))
				}
				held = nil
			case "first":
				// Answered after "second", which is answered first.
				held = append(held[:0:0], string(req.ID))
				hold <- string(req.ID)
			case "second":
				send(fmt.Sprintf(`{"return": {"status": "second", "for": %s}, "id": %s}`, req.ID, req.ID))
				for _, id := range held {
					send(fmt.Sprintf(`{"return": {"status": "first", "for": %s}, "id": %s}`, id, id))
				}
				held = nil
			case "fail":
				send(fmt.Sprintf(`{"error": {"class": "GenericError", "desc": "no such thing"}, "id": %s}`, req.ID))
			case "hangup":
				return
			}
		}
	}()
	return path
}

func TestMonitorMatchesRepliesToCommands(t *testing.T) {
	hold := make(chan string, 1)
	events := make(chan qmpEvent, 16)
	m, err := dialMonitor(fakeQMP(t, hold), 2*time.Second, func(e qmpEvent) { events <- e })
	assert.NilError(t, err)
	defer m.close()
	// Every wait is bounded: a reply that never comes fails the test
	// instead of hanging it.
	bounded := func() context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		t.Cleanup(cancel)
		return ctx
	}
	reply := func(out json.RawMessage) (string, string) {
		var st struct{ Status, For string }
		assert.NilError(t, json.Unmarshal(out, &st))
		return st.Status, st.For
	}
	status := func() (string, string) {
		out, err := m.run(bounded(), "query-status", nil)
		assert.NilError(t, err)
		return reply(out)
	}
	// The first command gets its own reply, not the capabilities' (the
	// event before that reply, and a reply without an id, are no replies
	// to it).
	st, id := status()
	assert.Equal(t, st, "running")
	assert.Equal(t, id, "nbh-1")

	// A command given up on: its late reply goes to nobody, and nothing
	// of it is left.
	ctx, cancel := context.WithCancel(bounded())
	go func() { <-hold; cancel() }()
	_, err = m.run(ctx, "hold", nil)
	assert.Assert(t, errors.Is(err, context.Canceled), "%v", err)
	m.mu.Lock()
	left := len(m.pending)
	m.mu.Unlock()
	assert.Equal(t, left, 0, "a given-up command is still pending")
	st, id = status()
	assert.Equal(t, st, "running")
	assert.Equal(t, id, "nbh-3")

	// Two commands in flight, answered in the other order: each gets its
	// own reply.
	type answer struct{ status, id string }
	first := make(chan answer, 1)
	go func() {
		out, err := m.run(bounded(), "first", nil)
		if err != nil {
			first <- answer{"error", err.Error()}
			return
		}
		s, i := reply(out)
		first <- answer{s, i}
	}()
	firstID := <-hold
	out, err := m.run(bounded(), "second", nil)
	assert.NilError(t, err)
	st, id = reply(out)
	assert.Equal(t, st, "second")
	a := <-first
	assert.Equal(t, a.status, "first", "%+v", a)
	assert.Equal(t, `"`+a.id+`"`, firstID)
	assert.Assert(t, id != a.id)

	_, err = m.run(bounded(), "fail", nil)
	assert.ErrorContains(t, err, "no such thing")

	// Every event arrived (before the greeting, around the capabilities'
	// reply, before each query-status' reply), with QEMU's time.
	assert.Equal(t, len(events), 4)
	e := <-events
	assert.Equal(t, e.Event, "NETDEV_STREAM_CONNECTED")
	assert.Equal(t, e.Time().Unix(), int64(1796311633))

	// A connection that ends ends the command waiting on it, and every
	// later one.
	_, err = m.run(bounded(), "hangup", nil)
	assert.Assert(t, errors.Is(err, errMonitorClosed), "%v", err)
	_, err = m.run(bounded(), "query-status", nil)
	assert.Assert(t, errors.Is(err, errMonitorClosed), "%v", err)
}

// A peer that never greets is given up on within the timeout.
func TestMonitorGivesUpOnASilentPeer(t *testing.T) {
	path := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", path)
	assert.NilError(t, err)
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			defer c.Close()
			time.Sleep(3 * time.Second)
		}
	}()
	_, err = dialMonitor(path, 200*time.Millisecond, nil)
	assert.ErrorContains(t, err, "greeting")
}
