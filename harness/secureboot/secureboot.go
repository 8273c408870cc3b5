// Package secureboot is what UEFI Secure Boot asks of a boot server: a key
// of the lab's own to sign the EFI images it builds (Unified Kernel Images)
// and its certificate for the firmware's db, the Authenticode hash by which
// a dbx revokes one image, and an image with its signature taken off (what
// an unsigned or self-built loader or kernel looks like to the firmware).
//
// Signing is done by sbsign (Debian's sbsigntool, the signer distributions
// and systemd's ukify use): Go's standard library has no PKCS#7, and no Go
// Authenticode signer is among the modules nbh may use. The lab's key is
// made fresh for each lab and lives in its private folder, removed with it:
// nothing it signed verifies on a machine that never enrolled that lab's
// certificate, unlike Debian's published "snakeoil" pair, whose private half
// anyone has.
package secureboot

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// ErrNoSbsign is returned when sbsign is not installed.
var ErrNoSbsign = errors.New("sbsign is not installed (Debian package sbsigntool)")

// Key is a signing key and its self-signed certificate, as files sbsign
// reads.
type Key struct {
	Cert    *x509.Certificate
	CertDER []byte
	keyPEM  string // path of the private key (mode 0600)
	certPEM string // path of the certificate
}

// NewKey makes an RSA-2048 key and a certificate for it named cn, in dir
// (created 0700).
func NewKey(dir, cn string) (*Key, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("secureboot: %w", err)
	}
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, fmt.Errorf("secureboot: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		return nil, fmt.Errorf("secureboot: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(10, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		// Code signing, as signers of EFI images carry it.
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		return nil, fmt.Errorf("secureboot: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("secureboot: %w", err)
	}
	k := &Key{Cert: cert, CertDER: der, keyPEM: filepath.Join(dir, "db.key"), certPEM: filepath.Join(dir, "db.crt")}
	pk := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(priv)})
	if err := os.WriteFile(k.keyPEM, pk, 0o600); err != nil {
		return nil, fmt.Errorf("secureboot: %w", err)
	}
	if err := os.WriteFile(k.certPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return nil, fmt.Errorf("secureboot: %w", err)
	}
	return k, nil
}

// Sign signs the EFI image in and writes the signed image to out (through
// a temporary file beside it renamed into place: a reader sees the whole
// old or the whole new image). A signature in already is replaced.
func (k *Key) Sign(ctx context.Context, in, out string) error {
	if _, err := exec.LookPath("sbsign"); err != nil {
		return ErrNoSbsign
	}
	tmp, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".signing.*")
	if err != nil {
		return fmt.Errorf("secureboot: %w", err)
	}
	tmp.Close()
	defer os.Remove(tmp.Name())
	cmd := exec.CommandContext(ctx, "sbsign", "--key", k.keyPEM, "--cert", k.certPEM, "--output", tmp.Name(), in)
	var outb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &outb, &outb
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("secureboot: sbsign %s: %v: %s", in, err, strings.TrimSpace(outb.String()))
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return fmt.Errorf("secureboot: %w", err)
	}
	return nil
}

// maxCertFile bounds a certificate file: db's certificates are a few KiB.
const maxCertFile = 1 << 20

// ReadCerts reads certificates for a firmware's db from a file: PEM (one
// or more CERTIFICATE blocks) or one DER certificate.
func ReadCerts(path string) ([][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file", path)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxCertFile+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxCertFile {
		return nil, fmt.Errorf("%s: larger than %d bytes: not a certificate", path, maxCertFile)
	}
	var out [][]byte
	for rest := b; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type == "CERTIFICATE" {
			out = append(out, blk.Bytes)
		}
	}
	if len(out) == 0 {
		out = [][]byte{b}
	}
	for _, der := range out {
		if _, err := x509.ParseCertificate(der); err != nil {
			return nil, fmt.Errorf("%s: not an X.509 certificate (PEM or DER): %v", path, err)
		}
	}
	return out, nil
}
