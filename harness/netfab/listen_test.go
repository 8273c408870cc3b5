package netfab

import (
	"errors"
	"net"
	"testing"

	"gotest.tools/v3/assert"
)

// TestMergedListener: connections to either listener come out of one
// Accept; after Close, Accept fails and neither listener takes more.
func TestMergedListener(t *testing.T) {
	a, err := net.Listen("tcp", "127.0.0.1:0")
	assert.NilError(t, err)
	b, err := net.Listen("tcp", "127.0.0.1:0")
	assert.NilError(t, err)
	m := merge([]net.Listener{a, b})
	for _, ln := range []net.Listener{b, a} {
		c, err := net.Dial("tcp", ln.Addr().String())
		assert.NilError(t, err)
		defer c.Close()
		got, err := m.Accept()
		assert.NilError(t, err)
		assert.Equal(t, got.LocalAddr().String(), ln.Addr().String())
		got.Close()
	}
	assert.Equal(t, m.Addr(), a.Addr())
	assert.NilError(t, m.Close())
	_, err = m.Accept()
	assert.Assert(t, errors.Is(err, net.ErrClosed))
	_, err = net.Dial("tcp", b.Addr().String())
	assert.Assert(t, err != nil, "a listener still takes connections")
	assert.NilError(t, m.Close()) // twice is fine
}
