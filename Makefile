# nbh — the netboot harness. See README.md.
export NBH_CACHE ?= $(CURDIR)/.cache
GO ?= go

.PHONY: all setup matrix test unit vet bench build clean fresh-check fuzz negative-controls negative-controls-hostile

all: build

# Install missing host packages (as root) and fetch the guest images.
setup:
	@scripts/setup

VERSION := $(shell git describe --always --dirty 2>/dev/null || echo devel)

build:
	$(GO) build -ldflags "-X nbh.dev/nbh/internal/version.Version=$(VERSION)" -o bin/nbh ./cmd/nbh

# The main job: boot every chain x root, with and without faults, on a clear
# and an IPsec network; print a table and write the reports (JUnit, JSON,
# HTML, and each row's artifacts) into out/report.
REPORT ?= out/report
matrix: setup build
	rm -rf $(REPORT)
	bin/nbh matrix --ipsec both --report $(REPORT)

# The whole test suite: unit tests, then the scenarios that boot real guests;
# then the race detector over the unit tests and over scenarios that boot
# guests side by side and talk to them; then the negative controls (each
# isolation rule's tests fail with the rule off).
# The first run's events go to out/test.json (go test -json, through
# gotestsum, the module's tool: go test's own output and a summary), and the
# tests slower than a minute are listed after it, pass or fail: what to
# trim when make test nears CI's limit.
RACE_SCENARIOS = TestConversation$$|TestStalledTransfer
test: setup vet
	@mkdir -p out
	@$(GO) tool gotestsum --format standard-quiet --jsonfile out/test.json -- -count=1 -parallel 16 -timeout 35m ./...; rc=$$?; \
	  echo "tests slower than a minute (out/test.json):"; \
	  $(GO) tool gotestsum tool slowest --jsonfile out/test.json --threshold 60s | head -40; \
	  exit $$rc
	$(GO) test -race -short -count=1 ./...
	$(GO) test -race -count=1 -parallel 4 -timeout 15m -run '$(RACE_SCENARIOS)' ./scenarios
	scripts/negative-controls

# Each isolation rule's tests pass with it and fail without it (a build
# with the nbh_rules_off tag; see internal/rules).
negative-controls:
	scripts/negative-controls

# The hostile-guest scenarios fail, naming the rule, with each isolation
# rule a guest can reach switched off (and pass with all on). Boots two
# guests per rule: about 25 minutes under TCG; logs in
# out/negative-controls-hostile.
negative-controls-hostile: setup
	scripts/negative-controls-hostile

# Only the fast tests (no guests booted).
unit: vet
	$(GO) test -count=1 -short ./...

vet:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.cache/*')); \
	  if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted" >&2; exit 1; fi
	$(GO) vet ./...
	$(GO) mod tidy -diff

# Does setup work on a machine with nothing installed? A throwaway Debian root
# (mmdebstrap) with only git, make, ca-certificates and Go: make setup, then
# one boot per architecture. Needs root; about 6 minutes.
fresh-check:
	ci/fresh-check

# Every fuzz target for FUZZTIME each (default 30s); see scripts/fuzz.
fuzz:
	scripts/fuzz

bench: setup
	$(GO) test -run '^$$' -bench Netboot -benchtime 1x -timeout 30m ./scenarios

clean:
	rm -rf bin
