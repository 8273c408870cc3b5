// Command cmd prints the isolation rules, one a line: the list
// scripts/negative-controls checks its table against.
package main

import (
	"fmt"

	"nbh.dev/nbh/internal/rules"
)

func main() {
	for _, r := range rules.All() {
		fmt.Println(r)
	}
}
