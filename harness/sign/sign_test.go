package sign

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"gotest.tools/v3/assert"
)

// TestSignAndVerify: a signature made with the lab key verifies with gpgv
// against the exported public key, and fails once the file changes.
func TestSignAndVerify(t *testing.T) {
	if _, err := exec.LookPath("gpgv"); err != nil {
		t.Skip("gpgv is not installed")
	}
	dir, err := os.MkdirTemp("", "nbh-sign-")
	assert.NilError(t, err)
	defer os.RemoveAll(dir)
	k, err := NewKey(context.Background(), filepath.Join(dir, "g"))
	assert.NilError(t, err)
	defer k.Close()
	f := filepath.Join(dir, "initrd.img")
	assert.NilError(t, os.WriteFile(f, []byte("archive"), 0o644))
	assert.NilError(t, k.Sign(context.Background(), f))
	verify := func() error {
		return exec.Command("gpgv", "--keyring", k.Public, f+".sig", f).Run()
	}
	assert.NilError(t, verify())
	assert.NilError(t, os.WriteFile(f, []byte("tampered"), 0o644))
	assert.Assert(t, verify() != nil, "a changed file still verified")
}
