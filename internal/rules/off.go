//go:build nbh_rules_off

package rules

import (
	"fmt"
	"os"
	"slices"
	"strings"
)

// off is the rules NBH_RULES_OFF switched off for this test build.
var off = func() map[string]bool {
	m := map[string]bool{}
	for _, r := range strings.Split(os.Getenv("NBH_RULES_OFF"), ",") {
		if r = strings.TrimSpace(r); r == "" {
			continue
		}
		if !slices.Contains(All(), r) {
			panic(fmt.Sprintf("NBH_RULES_OFF: no rule %q (rules: %s)", r, strings.Join(All(), ", ")))
		}
		m[r] = true
	}
	return m
}()

// On says whether rule is enforced: unless NBH_RULES_OFF names it.
func On(rule string) bool { return !off[rule] }
