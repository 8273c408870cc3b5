package httpboot

import (
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/bootfile"
	"nbh.dev/nbh/harness/timeline"
)

func serve(t *testing.T) (*httptest.Server, string, *timeline.Timeline) {
	base := t.TempDir()
	root := filepath.Join(base, "root")
	assert.NilError(t, os.Mkdir(root, 0o755))
	assert.NilError(t, os.WriteFile(filepath.Join(base, "secret"), []byte("secret"), 0o644))
	assert.NilError(t, os.WriteFile(filepath.Join(root, "kernel"), []byte("0123456789"), 0o644))
	assert.NilError(t, os.Symlink(filepath.Join(base, "secret"), filepath.Join(root, "abs-link")))
	assert.NilError(t, os.Symlink("../secret", filepath.Join(root, "rel-link")))
	r, err := os.OpenRoot(root)
	assert.NilError(t, err)
	t.Cleanup(func() { r.Close() })
	tl := timeline.New()
	srv := httptest.NewServer(Handler(bootfile.Root(r), tl))
	t.Cleanup(srv.Close)
	return srv, root, tl
}

func get(t *testing.T, url string, hdr map[string]string) (int, string) {
	req, err := http.NewRequest("GET", url, nil)
	assert.NilError(t, err)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	// Send the path exactly as written: no client-side cleaning.
	req.URL.Opaque = req.URL.Path
	resp, err := http.DefaultClient.Do(req)
	assert.NilError(t, err)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestServesFilesAndRanges(t *testing.T) {
	srv, _, tl := serve(t)
	code, body := get(t, srv.URL+"/kernel", nil)
	assert.Equal(t, code, 200)
	assert.Equal(t, body, "0123456789")
	code, body = get(t, srv.URL+"/kernel", map[string]string{"Range": "bytes=2-5"})
	assert.Equal(t, code, http.StatusPartialContent)
	assert.Equal(t, body, "2345")
	code, _ = get(t, srv.URL+"/missing", nil)
	assert.Equal(t, code, 404)
	var kinds []string
	for _, e := range tl.Events("") {
		kinds = append(kinds, e.Kind)
	}
	// A body's first bytes are progress (timeline.Meter).
	assert.DeepEqual(t, kinds, []string{"request", "progress", "transfer", "request", "progress", "transfer", "request", "not-found"})
}

func TestConfinedToRoot(t *testing.T) {
	srv, _, _ := serve(t)
	for _, p := range []string{"/../secret", "/x/../../secret", "/abs-link", "/rel-link", "/%2e%2e/secret"} {
		code, body := get(t, srv.URL+p, nil)
		assert.Assert(t, code >= 400, "%s: %d %q", p, code, body)
		assert.Assert(t, body != "secret", "%s escaped the root", p)
	}
	req, _ := http.NewRequest("PUT", srv.URL+"/kernel", nil)
	resp, err := http.DefaultClient.Do(req)
	assert.NilError(t, err)
	resp.Body.Close()
	assert.Equal(t, resp.StatusCode, http.StatusMethodNotAllowed)
}
