package nfs

import (
	"bufio"
	"encoding/binary"
	"net"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/timeline"
)

// TestOtherVersionsGetProgMismatch: an NFSv4 or MOUNT v1 call is answered
// PROG_MISMATCH 3..3 (so mount.nfs falls back to v3), and the connection
// stays in step for the v3 calls that follow it, pipelined.
func TestOtherVersionsGetProgMismatch(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assert.NilError(t, err)
	tl := timeline.New()
	s := Serve(ln, tl, Quota{})
	defer s.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	assert.NilError(t, err)
	defer c.Close()
	var out []byte
	for _, m := range [][]byte{call(1, progNFS, 4, 0), call(2, progNFS, 3, 0), call(3, progMount, 1, 0), call(4, progMount, 3, 0), call(5, progNFS, 2, 0)} {
		out = append(out, withRecordMark(m)...)
	}
	_, err = c.Write(out)
	assert.NilError(t, err)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	got := map[uint32]uint32{}
	for range 5 {
		rec, err := readRecord(r, maxRecord)
		assert.NilError(t, err)
		xid := binary.BigEndian.Uint32(rec)
		stat, body := reply(t, rec, xid)
		got[xid] = stat
		if stat == progMismatch {
			assert.Equal(t, len(body), 8)
			assert.Equal(t, binary.BigEndian.Uint32(body), uint32(3))
			assert.Equal(t, binary.BigEndian.Uint32(body[4:]), uint32(3))
		}
	}
	assert.DeepEqual(t, got, map[uint32]uint32{1: progMismatch, 2: success, 3: progMismatch, 4: success, 5: progMismatch})
	n := 0
	for _, e := range tl.Events("") {
		if e.Kind == "version-mismatch" {
			n++
			assert.Assert(t, strings.Contains(e.Msg, "version 3 only"), e.Msg)
		}
	}
	assert.Equal(t, n, 3)
}

// TestRecordTracker: the gate's own replies wait for a record of go-nfs's
// that is being written in pieces.
func TestRecordTracker(t *testing.T) {
	var tr recordTracker
	assert.Assert(t, tr.atBoundary())
	rec := append(binary.BigEndian.AppendUint32(nil, 6), "abcdef"...) // a fragment, not the last
	rec = append(rec, binary.BigEndian.AppendUint32(nil, 1<<31|2)...) // the last, 2 bytes
	rec = append(rec, "gh"...)
	for i := range rec {
		tr.feed(rec[i : i+1])
		assert.Equal(t, tr.atBoundary(), i == len(rec)-1, "after byte %d", i)
	}
	tr.feed(withRecordMark([]byte("xyz")))
	assert.Assert(t, tr.atBoundary())
}
