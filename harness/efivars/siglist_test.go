package efivars

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"os"
	"strings"
	"testing"

	"gotest.tools/v3/assert"

	"nbh.dev/nbh/images"
)

// msVars is Debian's OVMF variable store with Microsoft's keys enrolled.
func msVars(t *testing.T) []byte {
	t.Helper()
	p, err := images.Open(os.Getenv("NBH_CACHE")).Path(context.Background(), "amd64", images.OVMFVarsMS())
	assert.NilError(t, err)
	b, err := os.ReadFile(p)
	assert.NilError(t, err)
	return b
}

// What Debian's build enrolled reads back as it is: db holds Microsoft's
// two CAs as X.509 certificates (Windows' and the third-party UEFI CA that
// signs shim), dbx hashes.
func TestReadsTheEnrolledKeys(t *testing.T) {
	s, err := Open(msVars(t))
	assert.NilError(t, err)
	db, ok := s.Get("db", ImageSecurityDatabase)
	assert.Assert(t, ok)
	sigs, err := ParseSigLists(db)
	assert.NilError(t, err)
	var names []string
	for _, sig := range sigs {
		assert.Assert(t, sig.X509)
		c, err := x509.ParseCertificate(sig.Data)
		assert.NilError(t, err)
		names = append(names, c.Subject.CommonName)
	}
	assert.Assert(t, strings.Contains(strings.Join(names, "\n"), "Microsoft Corporation UEFI CA 2011"), "%q", names)
	dbx, ok := s.Get("dbx", ImageSecurityDatabase)
	assert.Assert(t, ok)
	sigs, err = ParseSigLists(dbx)
	assert.NilError(t, err)
	assert.Assert(t, len(sigs) > 0 && sigs[0].SHA256 && len(sigs[0].Data) == sha256.Size)
}

// Appending keeps what was there, adds the list, keeps the variable's
// authentication fields, and leaves a store the next Open reads.
func TestAppendSigList(t *testing.T) {
	b := msVars(t)
	s, err := Open(b)
	assert.NilError(t, err)
	oldDB, _ := s.Get("db", ImageSecurityDatabase)
	oldDB = bytes.Clone(oldDB)
	auth := func() []byte {
		var h []byte
		s.walk(func(off int, v Variable, live bool) {
			if live && v.Name == "db" {
				h = bytes.Clone(s.b[off+8 : off+36])
			}
		})
		return h
	}
	before := auth()
	assert.Assert(t, !bytes.Equal(before, make([]byte, 28)), "Debian's db has no time stamp to keep")
	owner := mustGUID("6E624800-0000-4E42-4800-6E6268000001")
	cert := []byte("not parsed here: a certificate's DER")
	assert.NilError(t, s.AppendSigList("db", X509List(owner, cert)))
	h := sha256.Sum256([]byte("an image"))
	assert.NilError(t, s.AppendSigList("dbx", SHA256List(owner, h)))
	assert.NilError(t, s.AppendSigList("dbx", SHA256List(owner)), "an empty list is nothing to add")

	s2, err := Open(b)
	assert.NilError(t, err)
	db, _ := s2.Get("db", ImageSecurityDatabase)
	assert.Assert(t, bytes.HasPrefix(db, oldDB))
	sigs, err := ParseSigLists(db)
	assert.NilError(t, err)
	last := sigs[len(sigs)-1]
	assert.Assert(t, last.X509 && last.Owner == owner && bytes.Equal(last.Data, cert))
	assert.DeepEqual(t, auth(), before)
	dbx, _ := s2.Get("dbx", ImageSecurityDatabase)
	sigs, err = ParseSigLists(dbx)
	assert.NilError(t, err)
	last = sigs[len(sigs)-1]
	assert.Assert(t, last.SHA256 && bytes.Equal(last.Data, h[:]))
	vars, err := s2.Vars()
	assert.NilError(t, err)
	n := 0
	for _, v := range vars {
		if v.Name == "db" {
			n++
		}
	}
	assert.Equal(t, n, 1, "the old db is still live")
}

// Broken lists are errors, and a store without room is left as it was.
func TestSigListsRefuseGarbage(t *testing.T) {
	for _, b := range [][]byte{
		{1, 2, 3},
		append(make([]byte, 16), 0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0, 16, 0, 0, 0),
		append(make([]byte, 16), 28+20, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0), // 20 bytes of signatures of 16
	} {
		_, err := ParseSigLists(append(b, make([]byte, 20)...))
		assert.Assert(t, err != nil, "%x", b)
	}
	b := make([]byte, 1<<20)
	assert.NilError(t, Format(b))
	s, err := Open(b)
	assert.NilError(t, err)
	assert.NilError(t, s.Set(Variable{Name: "X", GUID: globalVariable, Attributes: 7, Data: []byte{1}}))
	err = s.Set(Variable{Name: "X", GUID: globalVariable, Attributes: 7, Data: make([]byte, armVirtBlock)})
	assert.ErrorContains(t, err, "no room")
	x, ok := s.Get("X", globalVariable)
	assert.Assert(t, ok, "a failed Set deleted the old copy")
	assert.DeepEqual(t, x, []byte{1})
}
