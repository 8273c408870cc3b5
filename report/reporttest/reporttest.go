// Package reporttest checks an HTML report the way a reader meets it: as
// rendered by headless Chromium, scripts run.
package reporttest

import (
	"context"
	"encoding/xml"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/net/html"

	"nbh.dev/nbh/internal/browser"
)

// Page is what the rendered index.html shows.
type Page struct {
	Rows   []string // row IDs, in order
	Failed []string // IDs of rows marked failed
	Hidden []string // IDs of rows the filters hid
	Links  []string // every relative href, as written
	Shown  string   // the filter's "N shown" text
}

// Render loads dir/index.html (with an optional #fragment of filters) in
// Chromium and reads the DOM it produced.
func Render(ctx context.Context, dir, fragment string) (*Page, error) {
	abs, err := filepath.Abs(filepath.Join(dir, "index.html"))
	if err != nil {
		return nil, err
	}
	u := url.URL{Scheme: "file", Path: abs, Fragment: fragment}
	dom, err := browser.DumpDOM(ctx, u.String())
	if err != nil {
		return nil, err
	}
	doc, err := html.Parse(strings.NewReader(dom))
	if err != nil {
		return nil, err
	}
	p := &Page{}
	var walk func(*html.Node)
	walk = func(n *html.Node) {
		if n.Type == html.ElementNode {
			a := attrs(n)
			if n.Data == "tr" && hasClass(a["class"], "row") {
				id := strings.TrimPrefix(a["id"], "row-")
				p.Rows = append(p.Rows, id)
				if hasClass(a["class"], "fail") {
					p.Failed = append(p.Failed, id)
				}
				if _, hidden := a["hidden"]; hidden {
					p.Hidden = append(p.Hidden, id)
				}
			}
			if n.Data == "a" && a["href"] != "" && !strings.HasPrefix(a["href"], "#") {
				p.Links = append(p.Links, a["href"])
			}
			if n.Data == "span" && a["id"] == "shown" && n.FirstChild != nil {
				p.Shown = n.FirstChild.Data
			}
		}
		for c := n.FirstChild; c != nil; c = c.NextSibling {
			walk(c)
		}
	}
	walk(doc)
	return p, nil
}

// CheckLinks verifies that every link of the page resolves to a file under
// dir and that a link's #Ln anchor exists in the page it points to.
func CheckLinks(dir string, links []string) error {
	for _, l := range links {
		path, frag, _ := strings.Cut(l, "#")
		if strings.Contains(path, "://") {
			return fmt.Errorf("link %q leaves the report (the page must be self-contained)", l)
		}
		p := filepath.Join(dir, filepath.FromSlash(path))
		b, err := os.ReadFile(p)
		if err != nil {
			return fmt.Errorf("link %q: %v", l, err)
		}
		if frag != "" && !strings.Contains(string(b), `id="`+frag+`"`) {
			return fmt.Errorf("link %q: no anchor %q in %s", l, frag, p)
		}
	}
	return nil
}

func attrs(n *html.Node) map[string]string {
	m := map[string]string{}
	for _, a := range n.Attr {
		m[a.Key] = a.Val
	}
	return m
}

func hasClass(class, want string) bool {
	for _, c := range strings.Fields(class) {
		if c == want {
			return true
		}
	}
	return false
}

// JUnitCounts reads a JUnit file's totals: testcases and failures.
func JUnitCounts(path string) (tests, failures int, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, 0, err
	}
	var doc struct {
		Tests    int `xml:"tests,attr"`
		Failures int `xml:"failures,attr"`
		Suites   []struct {
			Cases []struct {
				Failure *struct{} `xml:"failure"`
			} `xml:"testcase"`
		} `xml:"testsuite"`
	}
	if err := xml.Unmarshal(b, &doc); err != nil {
		return 0, 0, fmt.Errorf("%s: %w", path, err)
	}
	// The totals must agree with the testcases they count.
	for _, s := range doc.Suites {
		for _, c := range s.Cases {
			tests++
			if c.Failure != nil {
				failures++
			}
		}
	}
	if tests != doc.Tests || failures != doc.Failures {
		return 0, 0, fmt.Errorf("%s: totals say %d tests, %d failures; the testcases %d, %d", path, doc.Tests, doc.Failures, tests, failures)
	}
	return tests, failures, nil
}
