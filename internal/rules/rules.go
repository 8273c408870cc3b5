// Package rules names the isolation rules the lab enforces, each at the one
// place a guest cannot get around, so that a negative control can switch
// one off and show that the tests of that rule then fail (make
// negative-controls). Only a build with the nbh_rules_off tag can switch a
// rule off (NBH_RULES_OFF: names, comma-separated); in every other build
// On is true, whatever the environment says.
package rules

// The rules, by the boundary each holds.
const (
	PathOwner      = "path-owner"      // a guest's boot files go to its own address only (Lab.open)
	OwnBootScript  = "own-boot-script" // U-Boot's one script name, Debian's signed GRUB's config names: each guest gets its own (Lab.open)
	NoSecretInDHCP = "no-secret-in-dhcp"
	ProtectedPorts = "protected-ports"  // a guest's frames go to the boot server only (netfab forward)
	DHCPToOwner    = "dhcp-to-owner"    // a DHCP reply goes to its client's port only (netfab)
	PortSource     = "port-source"      // a port speaks with its MAC and leased addresses only (netfab)
	DHCPSnooping   = "dhcp-snooping"    // DHCP from a port asks for its MAC, in one piece (netfab)
	NDP            = "ndp"              // neighbor discovery answers for the port's own addresses (netfab)
	RouterMessages = "router-messages"  // no router advertisement or redirect from a guest (netfab)
	IPv6Policy     = "ipv6-policy"      // under an IPsec policy, no IPv6 reaches the host (netfab)
	GuestMAC       = "guest-mac"        // no port with a group, zero or the host's MAC (netfab)
	DHCPv6Identity = "dhcpv6-identity"  // DHCPv6 knows a client by its address, not its DUID (dhcp)
	NFSExport      = "nfs-export"       // NFS operations stay inside the export (os.Root)
	NFSHandles     = "nfs-handles"      // an NFS handle names the file it was given for
	NFSQuota       = "nfs-quota"        // what a guest adds to its root is bounded
	ISCSIMemory    = "iscsi-memory"     // an iSCSI session's memory is bounded
	ArchiveOneRead = "archive-one-read" // an archive is keyed by the bytes it was built from
	BundleBounds   = "bundle-bounds"    // a packed bundle unpacks within bounds
)

// All is every rule, in the order above.
func All() []string {
	return []string{PathOwner, OwnBootScript, NoSecretInDHCP, ProtectedPorts, DHCPToOwner, PortSource, DHCPSnooping, NDP,
		RouterMessages, IPv6Policy, GuestMAC, DHCPv6Identity, NFSExport, NFSHandles, NFSQuota, ISCSIMemory, ArchiveOneRead, BundleBounds}
}
