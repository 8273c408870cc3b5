package secureboot_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness/secureboot"
	"nbh.dev/nbh/harness/uki"
	"nbh.dev/nbh/images"
)

// signed fetches one of Debian's signed EFI images from the image cache.
func signed(t *testing.T, arch string, f images.File) []byte {
	t.Helper()
	p, err := images.Open(os.Getenv("NBH_CACHE")).Path(context.Background(), arch, f)
	assert.NilError(t, err)
	b, err := os.ReadFile(p)
	assert.NilError(t, err)
	return b
}

// signersDigest is the image hash inside an Authenticode signature, found
// without parsing the image: the SHA-256 DigestInfo that follows the
// SpcIndirectDataContent object identifier in the PKCS#7 blob. It is what
// the signer (Microsoft for shim, Debian for GRUB and the kernel, sbsign
// for the lab) computed.
func signersDigest(t *testing.T, img []byte) string {
	t.Helper()
	spcIndirectData := []byte{0x06, 0x0a, 0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x02, 0x01, 0x04}
	sha256DigestInfo := []byte{0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}
	i := bytes.Index(img, spcIndirectData)
	assert.Assert(t, i > 0, "no Authenticode signature")
	j := bytes.Index(img[i:], sha256DigestInfo)
	assert.Assert(t, j > 0, "no SHA-256 digest in the signature")
	at := i + j + len(sha256DigestInfo)
	return hex.EncodeToString(img[at : at+32])
}

func hexHash(t *testing.T, img []byte) string {
	t.Helper()
	h, err := secureboot.Hash(img)
	assert.NilError(t, err)
	return hex.EncodeToString(h[:])
}

// The hash is the one Debian's and Microsoft's signers signed, for PE32+
// images of both architectures (shim, GRUB, the kernel's EFI stub).
func TestHashIsWhatTheSignersSigned(t *testing.T) {
	for _, c := range []struct {
		arch string
		f    images.File
	}{
		{"amd64", images.ShimX64()}, {"amd64", images.GRUBNetX64()},
		{"arm64", images.ShimArm64()}, {"arm64", images.GRUBNetArm64()},
	} {
		img := signed(t, c.arch, c.f)
		assert.Equal(t, hexHash(t, img), signersDigest(t, img), c.f.Path)
	}
	k, err := images.Open(os.Getenv("NBH_CACHE")).Kernel(context.Background(), "amd64")
	assert.NilError(t, err)
	img, err := os.ReadFile(k.Image)
	assert.NilError(t, err)
	assert.Equal(t, hexHash(t, img), signersDigest(t, img), "Debian's kernel")
}

// A stripped image carries no signature (sbverify finds none) and hashes
// the same; the rest of it is the signed image's bytes.
func TestStrip(t *testing.T) {
	img := signed(t, "amd64", images.GRUBNetX64())
	ok, err := secureboot.Signed(img)
	assert.NilError(t, err)
	assert.Assert(t, ok)
	bare, err := secureboot.Strip(img)
	assert.NilError(t, err)
	ok, err = secureboot.Signed(bare)
	assert.NilError(t, err)
	assert.Assert(t, !ok)
	assert.Equal(t, hexHash(t, bare), hexHash(t, img))
	assert.Assert(t, len(bare) < len(img))
	p := filepath.Join(t.TempDir(), "bare.efi")
	assert.NilError(t, os.WriteFile(p, bare, 0o644))
	out, err := exec.Command("sbverify", "--list", p).CombinedOutput()
	assert.NilError(t, err, string(out))
	assert.Assert(t, !bytes.Contains(out, []byte("signature 1")), string(out))
}

// What the lab's key signs verifies against its certificate (sbverify, an
// implementation not nbh's), carries the hash nbh computes, and a changed
// byte breaks it.
func TestSignedByTheLabsKey(t *testing.T) {
	if _, err := exec.LookPath("sbsign"); err != nil {
		t.Fatal(secureboot.ErrNoSbsign)
	}
	dir := t.TempDir()
	k, err := secureboot.NewKey(filepath.Join(dir, "key"), "nbh test key")
	assert.NilError(t, err)
	fi, err := os.Stat(filepath.Join(dir, "key", "db.key"))
	assert.NilError(t, err)
	assert.Equal(t, fi.Mode().Perm(), os.FileMode(0o600))
	in := filepath.Join(dir, "grub.efi")
	bare, err := secureboot.Strip(signed(t, "arm64", images.GRUBNetArm64()))
	assert.NilError(t, err)
	assert.NilError(t, os.WriteFile(in, bare, 0o644))
	out := filepath.Join(dir, "grub.signed.efi")
	assert.NilError(t, k.Sign(context.Background(), in, out))
	cert := filepath.Join(dir, "key", "db.crt")
	b, err := exec.Command("sbverify", "--cert", cert, out).CombinedOutput()
	assert.NilError(t, err, string(b))
	img, err := os.ReadFile(out)
	assert.NilError(t, err)
	assert.Equal(t, hexHash(t, img), signersDigest(t, img))
	assert.Equal(t, hexHash(t, img), hexHash(t, bare))

	// Debian's own signature does not verify against the lab's key (and
	// does against Debian's own signer's certificate in it: sbverify can
	// tell).
	debian := filepath.Join(dir, "debian.efi")
	assert.NilError(t, os.WriteFile(debian, signed(t, "arm64", images.GRUBNetArm64()), 0o644))
	b, err = exec.Command("sbverify", "--cert", cert, debian).CombinedOutput()
	assert.Assert(t, err != nil, "Debian's GRUB verified against the lab's key: %s", b)
	b, err = exec.Command("sbverify", "--list", debian).CombinedOutput()
	assert.NilError(t, err, string(b))
	assert.Assert(t, bytes.Contains(b, []byte("Debian")), string(b))
	// One changed byte in a section.
	img[len(img)/3] ^= 1
	tampered := filepath.Join(dir, "tampered.efi")
	assert.NilError(t, os.WriteFile(tampered, img, 0o644))
	b, err = exec.Command("sbverify", "--cert", cert, tampered).CombinedOutput()
	assert.Assert(t, err != nil, "a tampered image verified: %s", b)
}

// A Unified Kernel Image as the lab builds it (systemd's stub with
// sections appended, gaps between them) carries, once sbsign signed it, the
// hash nbh computes for its dbx entry: what the firmware compares.
func TestHashOfASignedUKI(t *testing.T) {
	dir := t.TempDir()
	k, err := secureboot.NewKey(filepath.Join(dir, "key"), "nbh test key")
	assert.NilError(t, err)
	stub := signed(t, "amd64", images.StubX64())
	_, err = uki.Build(filepath.Join(dir, "uki.efi"), stub, []uki.Section{
		{Name: ".cmdline", Data: []byte("console=ttyS0")},
		{Name: ".linux", Data: bytes.Repeat([]byte{0xa5}, 100001)},
		{Name: ".initrd", Data: bytes.Repeat([]byte{0x5a}, 77777)},
	})
	assert.NilError(t, err)
	assert.NilError(t, k.Sign(context.Background(), filepath.Join(dir, "uki.efi"), filepath.Join(dir, "signed.efi")))
	img, err := os.ReadFile(filepath.Join(dir, "signed.efi"))
	assert.NilError(t, err)
	assert.Equal(t, hexHash(t, img), signersDigest(t, img))
}

func TestReadCerts(t *testing.T) {
	dir := t.TempDir()
	k, err := secureboot.NewKey(dir, "nbh test key")
	assert.NilError(t, err)
	certs, err := secureboot.ReadCerts(filepath.Join(dir, "db.crt"))
	assert.NilError(t, err)
	assert.DeepEqual(t, certs, [][]byte{k.CertDER})
	der := filepath.Join(dir, "db.der")
	assert.NilError(t, os.WriteFile(der, k.CertDER, 0o644))
	certs, err = secureboot.ReadCerts(der)
	assert.NilError(t, err)
	assert.DeepEqual(t, certs, [][]byte{k.CertDER})
	_, err = secureboot.ReadCerts(filepath.Join(dir, "db.key"))
	assert.ErrorContains(t, err, "not an X.509 certificate")
}

// A broken image is an error, never a panic or a read past its end.
func FuzzHash(f *testing.F) {
	f.Add([]byte("MZ"))
	f.Add(append([]byte("MZ"), make([]byte, 0x40)...))
	// Real images, cut to their headers and a little more (the fuzzer
	// mutates offsets and sizes from there).
	for _, img := range []images.File{images.StubX64(), images.StubArm64()} {
		p, err := images.Open(os.Getenv("NBH_CACHE")).Path(context.Background(), map[bool]string{true: "amd64", false: "arm64"}[img == images.StubX64()], img)
		if err != nil {
			f.Fatal(err)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b[:min(len(b), 4096)])
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		secureboot.Hash(b)
		secureboot.Strip(b)
	})
}
