//go:build !nbh_rules_off

package rules

// On says whether rule is enforced: always, in this build.
func On(rule string) bool { return true }
