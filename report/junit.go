package report

import (
	"encoding/xml"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// JUnit: one testsuite per chain, one testcase per row (classname = the
// chain, name = root/network/fault), failure message = reason, stage and
// detail, system-out = the console tail, stage durations as properties.
type junitSuites struct {
	XMLName  xml.Name     `xml:"testsuites"`
	Name     string       `xml:"name,attr"`
	Tests    int          `xml:"tests,attr"`
	Failures int          `xml:"failures,attr"`
	Errors   int          `xml:"errors,attr"`
	Time     float64      `xml:"time,attr"`
	Suites   []junitSuite `xml:"testsuite"`
}

type junitSuite struct {
	Name     string      `xml:"name,attr"`
	Tests    int         `xml:"tests,attr"`
	Failures int         `xml:"failures,attr"`
	Errors   int         `xml:"errors,attr"`
	Time     float64     `xml:"time,attr"`
	Cases    []junitCase `xml:"testcase"`
}

type junitCase struct {
	Classname  string         `xml:"classname,attr"`
	Name       string         `xml:"name,attr"`
	Time       float64        `xml:"time,attr"`
	Properties *junitProps    `xml:"properties,omitempty"`
	Failure    *junitProblem  `xml:"failure,omitempty"`
	Error      *junitProblem  `xml:"error,omitempty"`
	SystemOut  *junitCharData `xml:"system-out,omitempty"`
}

type junitProps struct {
	Props []junitProp `xml:"property"`
}

type junitProp struct {
	Name  string `xml:"name,attr"`
	Value string `xml:"value,attr"`
}

type junitProblem struct {
	Message string `xml:"message,attr"`
	Type    string `xml:"type,attr"`
	Body    string `xml:",chardata"`
}

type junitCharData struct {
	Body string `xml:",chardata"`
}

// CaseName is a row's JUnit testcase name: root/network/fault.
func (row Row) CaseName() string {
	f := row.Fault
	if f == "" {
		f = "no-fault"
	}
	return row.Root + "/" + row.Network + "/" + f
}

// WriteJUnit writes r as JUnit XML to path.
func (r *Report) WriteJUnit(path string) error {
	out := junitSuites{Name: "nbh matrix"}
	idx := map[string]int{}
	for _, row := range r.Rows {
		i, ok := idx[row.Chain]
		if !ok {
			i = len(out.Suites)
			idx[row.Chain] = i
			out.Suites = append(out.Suites, junitSuite{Name: row.Chain})
		}
		s := &out.Suites[i]
		c := junitCase{Classname: row.Chain, Name: row.CaseName(), Time: row.Verdict.ElapsedSeconds}
		props := []junitProp{{"expect", row.Expect}, {"outcome", row.Outcome}}
		for _, sp := range row.Spans {
			props = append(props, junitProp{"stage." + sp.Stage + ".seconds", fmt.Sprintf("%.2f", sp.Seconds)})
		}
		if row.Artifacts.Console != "" {
			props = append(props, junitProp{"artifacts", filepath.Dir(row.Artifacts.Console)})
		}
		c.Properties = &junitProps{props}
		switch {
		case row.Error != "":
			c.Error = &junitProblem{Message: row.Error, Type: "setup", Body: row.Error}
			s.Errors++
			out.Errors++
		case !row.Pass:
			msg := row.Outcome + "; expected " + row.Expect
			body := msg
			if row.Verdict.Line != "" {
				body += "\nline: " + row.Verdict.Line
			}
			if row.Verdict.Detail != "" {
				body += "\ndetail: " + row.Verdict.Detail
			}
			if row.Artifacts.Bundle != "" {
				body += "\nreproduce: nbh repro " + row.Artifacts.Bundle
			}
			c.Failure = &junitProblem{Message: msg, Type: row.Verdict.Reason, Body: body}
			s.Failures++
			out.Failures++
		}
		if len(row.Verdict.Tail) > 0 {
			c.SystemOut = &junitCharData{strings.Join(row.Verdict.Tail, "\n") + "\n"}
		}
		s.Tests++
		s.Time += c.Time
		out.Tests++
		out.Time += c.Time
		s.Cases = append(s.Cases, c)
	}
	b, err := xml.MarshalIndent(out, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, append([]byte(xml.Header), append(b, '\n')...), 0o644)
}
