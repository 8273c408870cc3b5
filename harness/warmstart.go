package harness

import (
	"bytes"
	"errors"
	"fmt"
	"time"

	"nbh.dev/nbh/harness/qemu"
	"nbh.dev/nbh/harness/timeline"
	"nbh.dev/nbh/harness/warm"
)

// warmStart is how a guest's machine starts in a lab with warm starts
// (Options.Warm): from a snapshot (snap), by making it (maker), or cold
// (how says why). The zero value: cold, in a lab without them.
type warmStart struct {
	key   string
	snap  *warm.Snapshot
	maker *warm.Maker
	how   string // for the timeline and WarmStart
}

// restoreTimeout bounds loading a saved machine (tens of MiB from a file).
const restoreTimeout = 60 * time.Second

// saveTimeout bounds saving one.
const saveTimeout = 60 * time.Second

// WarmStart says how the guest's machine started in a lab with warm starts
// (Options.Warm): "warm: ..." (from a snapshot of its firmware at its first
// frame), "saved: ..." (it started from reset and was saved there for the
// guests after it), or "cold: why". "" in a lab without them.
func (g *Guest) WarmStart() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.warm
}

// warmPlan decides how the guest's machine starts. What a machine does
// before its first request on the network must be the same in every guest started from
// its snapshot: anything that could differ is in the key
// (qemu.SnapshotKey), and a machine made for one lab alone starts cold.
func (g *Guest) warmPlan() warmStart {
	store := g.lab.opts.Warm
	if store == nil {
		return warmStart{}
	}
	cold := func(why string) warmStart { return warmStart{how: "cold: " + why} }
	switch {
	case g.port == nil:
		return cold("not on the lab's network")
	case g.Profile.Load == qemu.LoadKernel:
		return cold("no firmware: QEMU loads the kernel itself")
	case g.chain.signsImage():
		// Its db holds the lab's own key, made for each lab: no other
		// lab's guest starts the same machine.
		return cold("the firmware's Secure Boot db holds this lab's own key")
	}
	key, err := qemu.SnapshotKey(g.qemuConfig(""))
	if err != nil {
		return cold(err.Error())
	}
	snap, maker, why, err := store.Acquire(g.lab.ctx, key)
	switch {
	case err != nil:
		return cold(err.Error())
	case why != "":
		return cold(why)
	case snap != nil:
		return warmStart{key: key, snap: snap, how: fmt.Sprintf("warm: restored at the firmware's first request on the network (%.1fs of firmware start skipped; snapshot %s)", snap.Firmware.Seconds(), key)}
	}
	return warmStart{key: key, maker: maker, how: "saved: started from reset and saved at its first request on the network for the guests after it (snapshot " + key + ")"}
}

// saveWarm saves the guest's machine at its first request on the network (the port holds it
// and what follows), then lets it run on and the frames go: the guest goes
// on booting as if its first request had taken a moment longer. A machine
// QEMU cannot save (a device that does not migrate) is recorded as such:
// the guests after it start cold and say why.
func (g *Guest) saveWarm(w warmStart) {
	firmware := time.Since(g.Start)
	g.mu.Lock()
	proc, con := g.proc, g.con
	g.mu.Unlock()
	for i := 0; proc == nil || con == nil; i++ {
		// The first request can come before launch has recorded the
		// process (it is read from the socket at once).
		if i > 500 {
			w.maker.Abandon()
			g.port.Release()
			return
		}
		time.Sleep(10 * time.Millisecond)
		g.mu.Lock()
		proc, con = g.proc, g.con
		g.mu.Unlock()
	}
	meta := warm.Meta{Machine: g.Profile.Name(), QEMU: qemu.Version(g.Profile.Arch), Made: time.Now(), Firmware: firmware}
	err := proc.SaveState(w.maker.StatePath(), saveTimeout)
	var what string
	switch {
	case errors.Is(err, qemu.ErrCannotSave):
		w.maker.Cannot(meta, err.Error())
		what = "this machine cannot be saved, its guests start cold: " + err.Error()
	case err != nil:
		w.maker.Abandon()
		what = "not saved: " + err.Error()
	default:
		if err = w.maker.Save(meta, settled(con), g.port.Held()); err != nil {
			what = "not saved: " + err.Error()
		} else {
			what = fmt.Sprintf("saved at its first request on the network after %.1fs", firmware.Seconds())
		}
	}
	g.lab.tl.Emit(timeline.Event{Source: "qemu", Kind: "warm-save", Guest: g.Name, Msg: what})
	g.port.Release()
	if err := proc.Cont(); err != nil {
		g.lab.tl.Emit(timeline.Event{Source: "qemu", Kind: "warm-save", Guest: g.Name, Msg: "the machine did not run on after its save: " + err.Error()})
	}
}

// settled is the console's raw stream once it has stopped growing (the
// machine is stopped; what it wrote before may still be on its way through
// the terminal), waiting at most a second.
func settled(con interface{ Raw() []byte }) []byte {
	last := con.Raw()
	for i := 0; i < 20; i++ {
		time.Sleep(50 * time.Millisecond)
		now := con.Raw()
		if bytes.Equal(now, last) && i >= 2 {
			return now
		}
		last = now
	}
	return last
}
