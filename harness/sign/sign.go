// Package sign makes the lab's OpenPGP signing key and detached signatures
// with GnuPG, for the loaders that verify what they load: GRUB with an
// embedded public key and check_signatures=enforce reads FILE.sig next to
// every file it opens. GnuPG rather than a Go OpenPGP library because GRUB
// looks for the signer's key ID only in a signature's unhashed subpackets,
// and Go's x/crypto/openpgp puts it in the hashed ones (a known
// incompatibility: GRUB then finds no key and refuses).
package sign

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ErrNoGPG is returned when gpg is not installed.
var ErrNoGPG = errors.New("gpg is not installed (Debian package gpg)")

// Key is a signing key in a private GnuPG home.
type Key struct {
	home   string
	Public string // the public key, binary OpenPGP (what grub-mkimage --pubkey takes)
	ID     string // long key ID
}

// NewKey makes an RSA-2048 signing key in dir (a fresh folder; keep its path
// short: gpg-agent's socket lives there). Close stops the agent.
func NewKey(ctx context.Context, dir string) (*Key, error) {
	if _, err := exec.LookPath("gpg"); err != nil {
		return nil, ErrNoGPG
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	k := &Key{home: dir, Public: filepath.Join(dir, "pub.gpg")}
	if _, err := k.gpg(ctx, "--quick-generate-key", "nbh lab signing key <lab@nbh.dev>", "rsa2048", "sign", "never"); err != nil {
		return nil, err
	}
	out, err := k.gpg(ctx, "--with-colons", "--list-keys")
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Split(line, ":"); len(f) > 4 && f[0] == "pub" {
			k.ID = f[4]
		}
	}
	if k.ID == "" {
		return nil, errors.New("sign: gpg made no key")
	}
	pub, err := k.gpg(ctx, "--export", k.ID)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(k.Public, pub, 0o644); err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	return k, nil
}

// Sign writes a detached SHA-256 signature of file to file.sig, replacing
// any old one in one rename.
func (k *Key) Sign(ctx context.Context, file string) error {
	tmp := file + ".sig.new"
	os.Remove(tmp)
	if _, err := k.gpg(ctx, "--digest-algo", "SHA256", "--local-user", k.ID, "--output", tmp, "--detach-sign", file); err != nil {
		return err
	}
	return os.Rename(tmp, file+".sig")
}

// Close stops the key's gpg-agent.
func (k *Key) Close() error {
	cmd := exec.Command("gpgconf", "--kill", "gpg-agent")
	cmd.Env = append(os.Environ(), "GNUPGHOME="+k.home)
	return cmd.Run()
}

func (k *Key) gpg(ctx context.Context, args ...string) ([]byte, error) {
	base := []string{"--homedir", k.home, "--batch", "--no-tty", "--quiet", "--pinentry-mode", "loopback", "--passphrase", ""}
	cmd := exec.CommandContext(ctx, "gpg", append(base, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("sign: gpg %s: %v: %s", args[0], err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}
