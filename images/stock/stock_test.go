package stock

import (
	"context"
	"errors"
	"testing"

	"nbh.dev/nbh/images"
)

// TestRefusedBeforeAnyWork: an unknown generator or a foreign architecture
// is refused at once, with the reason, before anything is fetched.
func TestRefusedBeforeAnyWork(t *testing.T) {
	c := images.Open(t.TempDir())
	if _, err := Build(context.Background(), c, "mkinitcpio", hostArch(), nil); !errors.Is(err, ErrUnknownTool) {
		t.Errorf("unknown generator: got %v", err)
	}
	foreign := map[string]string{"amd64": "arm64", "arm64": "amd64"}[hostArch()]
	if foreign == "" {
		t.Skipf("host architecture %s", hostArch())
	}
	if _, err := Build(context.Background(), c, Dracut, foreign, nil); !errors.Is(err, ErrForeignArch) {
		t.Errorf("foreign architecture: got %v", err)
	}
}

func TestHasEntries(t *testing.T) {
	for in, want := range map[string]bool{
		"":                                    false,
		"# deb http://example/ x main\n\n":    false,
		"  \n#x\ndeb http://example/ x main":  true,
		"Types: deb\nURIs: http://example/\n": true,
	} {
		if got := hasEntries([]byte(in)); got != want {
			t.Errorf("hasEntries(%q) = %v", in, got)
		}
	}
}
