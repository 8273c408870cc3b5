package harness_test

import (
	"context"
	"fmt"
	"log"
	"os"

	"nbh.dev/nbh/harness"
	"nbh.dev/nbh/harness/bundle"
	"nbh.dev/nbh/images"
)

// Boot one guest of a chain and print how far it got. (Examples that boot
// guests are compiled, not run, by go test; the scenarios run them.)
func ExampleLab_Boot() {
	lab, err := harness.New(harness.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer lab.Close()
	g, err := lab.Boot(context.Background(), harness.Spec{Arch: "arm64", Firmware: "uboot", Root: harness.RootNFS})
	if err != nil {
		log.Fatal(err)
	}
	v := g.Wait(context.Background())
	if v.OK {
		fmt.Println("marker:", v.Line)
	} else {
		fmt.Printf("failed: %s at stage %s\n", v.Reason, v.Stage)
	}
}

// A fault makes the boot fail the way the fault says; the verdict names the
// reason and the stage, with the server side's evidence.
func ExampleLab_Boot_fault() {
	lab, err := harness.New(harness.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer lab.Close()
	fault, err := harness.LookupFault("missing-kernel")
	if err != nil {
		log.Fatal(err)
	}
	g, err := lab.Boot(context.Background(), harness.Spec{Arch: "amd64", Firmware: "seabios-ipxe",
		Faults: []harness.Fault{fault}})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(g.Wait(context.Background()).Err())
	// e.g. boot file fetch failed at stage loader after 0.6s: "http://10.0.2.2/g1/vmlinuz... No such file or directory (http://ipxe.org/2d0c613b)" (last http event: not-found /g1/vmlinuz 404 10 bytes in 0.00s)
}

// Replay a repro bundle: the same spec, lab seed and pins.
func ExampleFromBundle() {
	b, recorded, done, err := bundle.Open("artifacts/amd64-seabios-ipxe+missing-kernel")
	if err != nil {
		log.Fatal(err)
	}
	defer done()
	opts, spec, err := harness.FromBundle(b)
	if err != nil {
		log.Fatal(err)
	}
	pins, err := harness.BundlePins(b)
	if err != nil {
		log.Fatal(err)
	}
	opts.Cache = images.Open(os.Getenv("NBH_CACHE"))
	opts.Cache.PinsOverride = map[string]images.PinSet{spec.Arch: pins}
	lab, err := harness.New(opts)
	if err != nil {
		log.Fatal(err)
	}
	defer lab.Close()
	g, err := lab.Boot(context.Background(), spec)
	if err != nil {
		log.Fatal(err)
	}
	v := g.Wait(context.Background())
	fmt.Println("recorded:", recorded.Outcome(), "replayed:", v.Reason, "at", v.Stage)
}
