package efivars

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// Secure Boot's variables (UEFI 2.10, 32.4 and 32.6): PK and KEK under
// EFI_GLOBAL_VARIABLE, db (what may run) and dbx (what may not) under
// EFI_IMAGE_SECURITY_DATABASE_GUID, each a list of EFI_SIGNATURE_LISTs.
var (
	ImageSecurityDatabase = mustGUID("D719B2CB-3D3A-4596-A3BC-DAD00E67656F")
	GlobalVariable        = globalVariable

	certX509   = mustGUID("A5C059A1-94E4-4AA7-87B5-AB155C2BF072") // EFI_CERT_X509_GUID
	certSHA256 = mustGUID("C1C41626-504C-4092-ACA9-41F936934328") // EFI_CERT_SHA256_GUID
)

// TimeBasedAuthenticated is the attribute of db and dbx: written at run
// time only with a signed update. nbh writes the store before the first
// boot, as the firmware's own setup would, so it signs nothing.
const TimeBasedAuthenticated = 0x20

// dbAttributes are db's and dbx's attributes.
const dbAttributes = NonVolatile | BootserviceAccess | RuntimeAccess | TimeBasedAuthenticated

// X509List is an EFI_SIGNATURE_LIST of one X.509 certificate (DER), owned
// by owner.
func X509List(owner GUID, der []byte) []byte {
	return sigList(certX509, owner, [][]byte{der})
}

// SHA256List is an EFI_SIGNATURE_LIST of image hashes (Authenticode
// SHA-256), owned by owner.
func SHA256List(owner GUID, hashes ...[sha256.Size]byte) []byte {
	var data [][]byte
	for _, h := range hashes {
		data = append(data, h[:])
	}
	return sigList(certSHA256, owner, data)
}

// sigList is an EFI_SIGNATURE_LIST: the signature type, the list's size,
// an empty header, each signature's size, then each signature as its
// owner's GUID and its data (all of one size).
func sigList(typ, owner GUID, data [][]byte) []byte {
	if len(data) == 0 {
		return nil
	}
	sigSize := 16 + len(data[0])
	b := make([]byte, 28, 28+sigSize*len(data))
	copy(b, typ[:])
	binary.LittleEndian.PutUint32(b[16:], uint32(28+sigSize*len(data)))
	binary.LittleEndian.PutUint32(b[20:], 0)
	binary.LittleEndian.PutUint32(b[24:], uint32(sigSize))
	for _, d := range data {
		b = append(b, owner[:]...)
		b = append(b, d...)
	}
	return b
}

// Signature is one entry of a signature list: an X.509 certificate (DER)
// or an image hash.
type Signature struct {
	X509   bool
	SHA256 bool
	Owner  GUID
	Data   []byte
}

// ParseSigLists reads a variable's EFI_SIGNATURE_LISTs (db, dbx, KEK, PK).
func ParseSigLists(b []byte) ([]Signature, error) {
	var out []Signature
	le := binary.LittleEndian
	for len(b) > 0 {
		if len(b) < 28 {
			return nil, errors.New("efivars: signature list header cut short")
		}
		typ := GUID(b[:16])
		size, hdr, sigSize := int(le.Uint32(b[16:])), int(le.Uint32(b[20:])), int(le.Uint32(b[24:]))
		if size < 28+hdr || size > len(b) || sigSize < 16 || (size-28-hdr)%sigSize != 0 {
			return nil, fmt.Errorf("efivars: bad signature list (size %d, header %d, signature %d)", size, hdr, sigSize)
		}
		for off := 28 + hdr; off < size; off += sigSize {
			out = append(out, Signature{X509: typ == certX509, SHA256: typ == certSHA256,
				Owner: GUID(b[off : off+16]), Data: b[off+16 : off+sigSize]})
		}
		b = b[size:]
	}
	return out, nil
}

// AppendSigList adds a signature list to the security database variable
// name (db, dbx), creating it when the store has none.
func (s *Store) AppendSigList(name string, list []byte) error {
	if _, err := ParseSigLists(list); err != nil {
		return err
	}
	if len(list) == 0 {
		return nil
	}
	old, _ := s.Get(name, ImageSecurityDatabase)
	if _, err := ParseSigLists(old); err != nil {
		return fmt.Errorf("efivars: %s: %w", name, err)
	}
	data := append(append([]byte(nil), old...), list...)
	return s.Set(Variable{Name: name, GUID: ImageSecurityDatabase, Attributes: dbAttributes, Data: data})
}
