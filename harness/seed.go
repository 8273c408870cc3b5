package harness

import (
	"crypto/sha256"
	"fmt"
	"io"
	mathrand "math/rand/v2"
	"net"
	"path/filepath"
	"slices"
)

// guestRand is the source of a guest's random choices (ESP SPIs and keys,
// CHAP secrets): a ChaCha8 stream keyed by the lab's seed, the guest's name
// and MAC, so a replay with the same seed, name and MAC makes the same
// choices whatever else the lab booted before. Keys from it are as secret as
// the seed, which bundles mark as a secret.
func guestRand(seed, name string, mac net.HardwareAddr) io.Reader {
	key := sha256.Sum256(fmt.Appendf(nil, "nbh guest\x00%s\x00%s\x00%s", seed, name, mac))
	return mathrand.NewChaCha8(key)
}

// guestMAC is the MAC of the lab's n-th guest: 52:54:00:4e:42:NN for the
// first 255, then on into the fifth byte, so a lab never hands out one MAC
// twice (a byte(n) wrapped after 256 guests).
func guestMAC(n int) (net.HardwareAddr, error) {
	if n < 1 || n > 0xbdff {
		return nil, fmt.Errorf("lab: guest %d: out of MAC addresses", n)
	}
	return net.HardwareAddr{0x52, 0x54, 0x00, 0x4e, 0x42 + byte(n>>8), byte(n)}, nil
}

// absPaths makes the spec's host paths absolute: QEMU and the archive
// builder run in other folders than the caller.
func absPaths(spec *Spec) error {
	abs := func(p *string) error {
		if *p == "" {
			return nil
		}
		a, err := filepath.Abs(*p)
		if err != nil {
			return fmt.Errorf("spec: %w", err)
		}
		*p = a
		return nil
	}
	for _, p := range []*string{&spec.Kernel, &spec.Initrd, &spec.Artifacts, &spec.LoaderConfig, &spec.Loader,
		&spec.FirmwareCode, &spec.FirmwareVars, &spec.BIOS, &spec.NICROM, &spec.RootDir, &spec.RootImage} {
		if err := abs(p); err != nil {
			return err
		}
	}
	spec.SecureBootCerts = slices.Clone(spec.SecureBootCerts)
	for i := range spec.SecureBootCerts {
		if err := abs(&spec.SecureBootCerts[i]); err != nil {
			return err
		}
	}
	for _, m := range []*map[string]string{&spec.ArchiveFiles, &spec.RootFiles} {
		if *m == nil {
			continue
		}
		c := make(map[string]string, len(*m))
		for k, v := range *m {
			if err := abs(&v); err != nil {
				return err
			}
			c[k] = v
		}
		*m = c
	}
	return nil
}
