package scenarios

import (
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/ipsec"
	"nbh.dev/nbh/harness/nbhtest"
	"nbh.dev/nbh/harness/timeline"
)

// The kernel's words for Secure Boot as the firmware handed it over
// (Debian's kernel, amd64 and arm64 alike), and the lockdown that follows.
const (
	secureBootOn  = `secureboot: Secure boot enabled`
	secureBootOff = `secureboot: Secure boot disabled`
	lockedDown    = `Kernel is locked down from EFI Secure Boot`
)

// TestSecureBootBoots: the Secure Boot chains reach the marker with the
// kernel saying Secure Boot is on and the kernel locked down — through
// Debian's signed shim and GRUB (with the reference roots, NFS on the
// IPsec network too), through the lab-signed Unified Kernel Image, and
// through lab-signed iPXE (fetching the kernel, or SAN-booting a disk).
// The kernel's lines are steps the boot must print in order before the
// marker counts.
func TestSecureBootBoots(t *testing.T) {
	needGuests(t)
	t.Parallel()
	for _, c := range []struct {
		arch, firmware, root, secureBoot string
		ipsec                            bool
	}{
		{"amd64", "ovmf-shim", harness.RootNFS, "", false},
		{"arm64", "aavmf-shim", harness.RootISCSI, "", false},
		{"amd64", "ovmf-shim", harness.RootNFS, "", true},
		{"amd64", "ovmf-http", harness.RootNone, harness.SecureBootOn, false},
		{"arm64", "aavmf-http", harness.RootNone, harness.SecureBootOn, false},
		// iPXE and the kernel signed by the lab; a SAN disk's image too.
		{"arm64", "aavmf-ipxe", harness.RootNone, harness.SecureBootOn, false},
		{"amd64", "ovmf-pxe", harness.RootSANBoot, harness.SecureBootOn, false},
	} {
		name := c.arch + "/" + c.firmware + "/" + c.root + map[bool]string{true: "+ipsec"}[c.ipsec]
		t.Run(name, func(t *testing.T) {
			guestTest(t)
			if !selected(c.arch, c.firmware) {
				t.Skipf("chain %s/%s not selected by NBH_ARCH/NBH_FIRMWARE", c.arch, c.firmware)
			}
			var opts harness.Options
			if c.ipsec {
				opts.IPsec = ipsec.Required()
			}
			lab := nbhtest.NewLabWith(t, opts)
			g, err := lab.Boot(context.Background(), harness.Spec{Arch: c.arch, Firmware: c.firmware, Root: c.root, SecureBoot: c.secureBoot,
				Steps: []string{lockedDown, secureBootOn}, Artifacts: nbhtest.Artifacts(t, "g1")})
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			assert.Assert(t, v.OK, "%v\nlast console lines:\n%s", v.Err(), strings.Join(v.Tail, "\n"))
		})
	}
}

// TestSecureBootRefuses: each Secure Boot failure ends "secure boot
// violation" at the loader, with the refusing component's own line as the
// evidence — and the same unsigned kernel and loader boot with Secure Boot
// off (the kernel saying so).
func TestSecureBootRefuses(t *testing.T) {
	needGuests(t)
	t.Parallel()
	edk2 := `^BdsDxe: failed to load Boot\d+ ".*".*: (Access Denied|Security Violation)$`
	for _, c := range []struct {
		arch, firmware, secureBoot, fault string
		evidence                          string // "": the boot passes
	}{
		{"amd64", "ovmf-shim", "", "unsigned-kernel", `^error: bad shim signature\.$`},
		{"arm64", "aavmf-shim", "", "unsigned-loader", `Verification failed: \(0x1A\) Security Violation`},
		{"amd64", "ovmf-shim", "", "dbx-revoked", edk2},
		{"amd64", "ovmf-http", harness.SecureBootOn, "tampered-archive", edk2},
		{"arm64", "aavmf-http", harness.SecureBootOn, "corrupt-archive", edk2},
		{"amd64", "ovmf-shim", harness.SecureBootOff, "unsigned-kernel", ""},
		{"arm64", "aavmf-shim", harness.SecureBootOff, "unsigned-loader", ""},
	} {
		t.Run(c.arch+"/"+c.firmware+"/"+c.fault+"/"+c.secureBoot, func(t *testing.T) {
			guestTest(t)
			if !selected(c.arch, c.firmware) {
				t.Skipf("chain %s/%s not selected by NBH_ARCH/NBH_FIRMWARE", c.arch, c.firmware)
			}
			lab := nbhtest.NewLab(t)
			spec := harness.Spec{Arch: c.arch, Firmware: c.firmware, SecureBoot: c.secureBoot, Timeout: 120 * time.Second,
				Faults: []harness.Fault{fault(t, c.fault)}, Artifacts: nbhtest.Artifacts(t, "g1")}
			if c.evidence == "" {
				spec.Steps = []string{secureBootOff}
			}
			g, err := lab.Boot(context.Background(), spec)
			assert.NilError(t, err)
			v := g.Wait(context.Background())
			if c.evidence == "" {
				assert.Assert(t, v.OK, "with Secure Boot off: %v\nlast console lines:\n%s", v.Err(), strings.Join(v.Tail, "\n"))
				return
			}
			assert.Assert(t, !v.OK, "booted despite %s under Secure Boot: %s", c.fault, v.Line)
			assert.Equal(t, v.Reason, failure.SecureBoot, "%v\nlast console lines:\n%s", v.Err(), strings.Join(v.Tail, "\n"))
			assert.Equal(t, v.Stage, timeline.Loader, "%v", v.Err())
			assert.Assert(t, regexp.MustCompile(c.evidence).MatchString(strings.TrimSpace(v.Line)), "evidence %q is not the refusing component's", v.Line)
		})
	}
}

// TestSecureBootRefusedWhereMeaningless: Secure Boot on a chain whose
// loader nobody signed, a Secure Boot fault with it off or on the wrong
// chain, and a db certificate with Secure Boot off are errors at Boot.
func TestSecureBootRefusedWhereMeaningless(t *testing.T) {
	lab := nbhtest.NewLab(t)
	for _, c := range []struct {
		spec harness.Spec
		want string
	}{
		{harness.Spec{Arch: "amd64", Firmware: "ovmf-ipxe", SecureBoot: harness.SecureBootOn}, "cannot boot with UEFI Secure Boot"},
		{harness.Spec{Arch: "amd64", Firmware: "ovmf-shim", SecureBoot: "maybe"}, "want on or off"},
		{harness.Spec{Arch: "amd64", Firmware: "ovmf-http", Faults: []harness.Fault{fault(t, "dbx-revoked")}}, "does not apply"},
		{harness.Spec{Arch: "amd64", Firmware: "ovmf-shim", SecureBoot: harness.SecureBootOff, Faults: []harness.Fault{fault(t, "dbx-revoked")}}, "does not apply"},
		{harness.Spec{Arch: "amd64", Firmware: "ovmf-http", SecureBoot: harness.SecureBootOn, Faults: []harness.Fault{fault(t, "unsigned-kernel")}}, "does not apply"},
		{harness.Spec{Arch: "amd64", Firmware: "ovmf-http", Faults: []harness.Fault{fault(t, "tampered-archive")}}, "does not apply"},
		{harness.Spec{Arch: "amd64", Firmware: "ovmf-pxe", SecureBootCerts: []string{"/dev/null"}}, "Secure Boot on"},
	} {
		_, err := lab.Boot(context.Background(), c.spec)
		assert.ErrorContains(t, err, c.want, "%+v", c.spec)
	}
}
