package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"time"
)

// monitor is a QMP connection whose replies are matched to their commands
// by id. QEMU may send an event at any moment, even between the greeting
// and the reply to qmp_capabilities (a stream netdev's
// NETDEV_STREAM_CONNECTED comes right then): a client that takes the next
// message for the reply, as go-qemu's SocketMonitor does, answers every
// later command with the reply to the one before it (an empty query-status
// ended 12 riscv64 restores of a warm matrix). Here every command carries
// an id, one reader hands each reply to the command with its id and each
// event to onEvent, and a command given up on leaves nothing behind.
type monitor struct {
	conn    net.Conn
	onEvent func(qmpEvent)

	wmu sync.Mutex // one command on the wire at a time

	mu      sync.Mutex
	next    uint64
	pending map[string]chan qmpReply
	err     error // why the connection ended

	done chan struct{} // closed when the reader ends
}

// qmpEvent is an asynchronous message from QEMU.
type qmpEvent struct {
	Event     string `json:"event"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
	Data json.RawMessage `json:"data"`
}

// Time is when QEMU says the event happened.
func (e qmpEvent) Time() time.Time {
	return time.Unix(e.Timestamp.Seconds, e.Timestamp.Microseconds*1000)
}

// qmpMessage is any message: an event, a reply (return or error, with the
// id of its command), or the greeting.
type qmpMessage struct {
	qmpEvent
	QMP    json.RawMessage `json:"QMP"`
	ID     json.RawMessage `json:"id"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
}

type qmpReply struct {
	ret json.RawMessage
	err error
}

// errMonitorClosed: the connection ended before the reply.
var errMonitorClosed = errors.New("the connection ended")

// dialMonitor connects to QEMU's QMP socket at path, reads the greeting
// and leaves capabilities negotiation, all within timeout. onEvent is
// called, from the reader, for each event (it must not block).
func dialMonitor(path string, timeout time.Duration, onEvent func(qmpEvent)) (*monitor, error) {
	conn, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		return nil, err
	}
	m := &monitor{conn: conn, onEvent: onEvent, pending: map[string]chan qmpReply{}, done: make(chan struct{})}
	conn.SetDeadline(time.Now().Add(timeout))
	dec := json.NewDecoder(conn)
	// The greeting, then the reply to qmp_capabilities by its id, events
	// around either passed on.
	greeted := false
	for !greeted {
		var msg qmpMessage
		if err := dec.Decode(&msg); err != nil {
			conn.Close()
			return nil, fmt.Errorf("qmp: greeting: %w", err)
		}
		greeted = msg.QMP != nil
		m.event(msg)
	}
	if err := m.write("caps", "qmp_capabilities", nil); err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: capabilities: %w", err)
	}
	for {
		var msg qmpMessage
		if err := dec.Decode(&msg); err != nil {
			conn.Close()
			return nil, fmt.Errorf("qmp: capabilities: %w", err)
		}
		if string(msg.ID) == `"caps"` {
			if msg.Error != nil {
				conn.Close()
				return nil, fmt.Errorf("qmp: capabilities: %s", msg.Error.Desc)
			}
			break
		}
		m.event(msg)
	}
	conn.SetDeadline(time.Time{})
	go m.read(dec)
	return m, nil
}

func (m *monitor) event(msg qmpMessage) {
	if msg.Event != "" && m.onEvent != nil {
		m.onEvent(msg.qmpEvent)
	}
}

func (m *monitor) write(id, command string, args map[string]any) error {
	req := map[string]any{"execute": command, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	m.wmu.Lock()
	defer m.wmu.Unlock()
	_, err = m.conn.Write(append(b, '\n'))
	return err
}

// writeContext is write, given up when ctx ends first (a QEMU that stopped
// reading its monitor).
func (m *monitor) writeContext(ctx context.Context, id, command string, args map[string]any) error {
	done := make(chan error, 1)
	go func() { done <- m.write(id, command, args) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// read hands replies to their commands and events to onEvent until the
// connection ends; then every command still waiting gets the reason.
func (m *monitor) read(dec *json.Decoder) {
	defer close(m.done)
	for {
		var msg qmpMessage
		if err := dec.Decode(&msg); err != nil {
			var typeErr *json.UnmarshalTypeError
			if errors.As(err, &typeErr) {
				continue // a message of another shape; the stream is intact
			}
			why := fmt.Errorf("%w: %v", errMonitorClosed, err)
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				// Not JSON: nothing after it can be trusted.
				why = fmt.Errorf("%w: an unreadable message: %v", errMonitorClosed, err)
				m.conn.Close()
			}
			m.mu.Lock()
			m.err = why
			for id, ch := range m.pending {
				ch <- qmpReply{err: m.err}
				delete(m.pending, id)
			}
			m.mu.Unlock()
			return
		}
		if msg.Event != "" {
			m.event(msg)
			continue
		}
		var id string
		if json.Unmarshal(msg.ID, &id) != nil {
			continue // a reply to no command of ours
		}
		m.mu.Lock()
		ch := m.pending[id]
		delete(m.pending, id)
		m.mu.Unlock()
		if ch == nil {
			continue // given up on
		}
		r := qmpReply{ret: msg.Return}
		if msg.Error != nil {
			r.err = fmt.Errorf("%s: %s", msg.Error.Class, msg.Error.Desc)
		}
		ch <- r
	}
}

// run sends command and waits for its reply's "return", or for ctx's end
// or the connection's.
func (m *monitor) run(ctx context.Context, command string, args map[string]any) (json.RawMessage, error) {
	ch := make(chan qmpReply, 1)
	m.mu.Lock()
	if m.err != nil {
		err := m.err
		m.mu.Unlock()
		return nil, err
	}
	m.next++
	id := "nbh-" + strconv.FormatUint(m.next, 10)
	m.pending[id] = ch
	m.mu.Unlock()
	forget := func() {
		m.mu.Lock()
		delete(m.pending, id)
		m.mu.Unlock()
	}
	if err := m.writeContext(ctx, id, command, args); err != nil {
		forget()
		return nil, err
	}
	select {
	case r := <-ch:
		return r.ret, r.err
	case <-ctx.Done():
		forget()
		return nil, ctx.Err()
	}
}

// close ends the connection and waits for the reader.
func (m *monitor) close() {
	m.conn.Close()
	<-m.done
}
