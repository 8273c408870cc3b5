// Package failure names why a boot did not reach its marker. Every failed
// boot ends in exactly one Reason, attributed to the stage where it showed,
// so tests and reports can say what broke instead of "timed out".
package failure

// Reason is a classified cause of a failed boot.
type Reason string

const (
	None           Reason = ""
	NoDHCP         Reason = "no DHCP lease"
	LoaderFetch    Reason = "boot file fetch failed"
	LoaderError    Reason = "boot loader error"
	FirmwareNoBoot Reason = "firmware found nothing to boot"
	KernelPanic    Reason = "kernel panic"
	RootMount      Reason = "cannot mount root"
	NoNetDevice    Reason = "no network device"
	ModuleLoad     Reason = "module load failed"
	MissingModule  Reason = "missing module"
	StaleArchive   Reason = "stale boot archive"
	CorruptArchive Reason = "corrupt boot archive"
	BadSignature   Reason = "signature verification failed"
	// SecureBoot is UEFI Secure Boot refusing an image: the firmware (not
	// in db, or in dbx), shim (a loader not signed for it) or GRUB asking
	// shim (a kernel no trusted key signed).
	SecureBoot Reason = "secure boot violation"
	SANBoot    Reason = "SAN boot failed"
	// The IPsec network's reasons, from the lab's ESP gateway.
	ESPRequired   Reason = "root unreachable: ESP required"
	ESPAuth       Reason = "ESP authentication failed"
	ESPNoSA       Reason = "ESP SA mismatch (unknown SPI)"
	LoaderNoIPsec Reason = "boot loader cannot do IPsec"
	InitFailed    Reason = "init failed"
	GuestStopped  Reason = "guest stopped before the marker"
	QEMUFailed    Reason = "qemu failed"
	Deadline      Reason = "deadline exceeded"
	// Stalled is a file transfer the boot waited for that stopped moving
	// (the server, or the link, went quiet mid-file).
	Stalled     Reason = "transfer stalled"
	Interrupted Reason = "interrupted"
	Setup       Reason = "lab setup failed"
)

// Who says whose fault a reason usually is, in the manner of LAVA's
// infrastructure / job / test split: "lab" means the harness or host, "boot"
// means the boot chain under test.
func (r Reason) Who() string {
	switch r {
	case QEMUFailed, Setup, Interrupted:
		return "lab"
	case Deadline:
		return "unknown"
	default:
		return "boot"
	}
}
