package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"nbh.dev/nbh/harness/failure"
	"nbh.dev/nbh/harness/netfab"
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
// request on the network), "saved: ..." (from reset, and saved there for
// the guests after it), "cold: why" (from reset, and not saved: why). ""
// in a lab without them.
func (g *Guest) WarmStart() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.warm
}

// setWarm records how the machine's start turned out (and on the
// timeline).
func (g *Guest) setWarm(how string) {
	g.mu.Lock()
	g.warm = how
	g.mu.Unlock()
	g.lab.tl.Emit(timeline.Event{Source: "qemu", Kind: "warm", Guest: g.Name, Msg: how})
}

// warmPlan decides how the guest's machine starts. What a machine does
// before its first request on the network must be the same in every guest
// started from its snapshot: anything that could differ is in the key
// (qemu.SnapshotKey), and a machine made for one lab alone, or one whose
// console is answered otherwise, starts cold.
func (g *Guest) warmPlan(ctx context.Context) warmStart {
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
	case g.spec.KeepPrompts:
		// Its firmware's prompts run out instead of being answered: not
		// the machine the others start.
		return cold("its firmware's prompts are left to run out (Spec.KeepPrompts)")
	}
	key, err := qemu.SnapshotKey(g.qemuConfig(""))
	if err != nil {
		return cold(err.Error())
	}
	snap, maker, why, err := store.Acquire(ctx, key, g.private)
	switch {
	case err != nil:
		return cold(err.Error())
	case why != "":
		return cold(why)
	case snap != nil:
		return warmStart{key: key, snap: snap, how: fmt.Sprintf("warm: restored at the firmware's first request on the network (%.1fs of firmware start skipped; snapshot %s)", snap.Firmware.Seconds(), key)}
	}
	return warmStart{key: key, maker: maker, how: "cold: started from reset, to be saved at its first request on the network for the guests after it (snapshot " + key + "); it has not asked yet"}
}

// saveWarm saves the guest's machine at its first request on the network
// (the port holds it and what came before), then lets it run on and the
// frames go: the guest goes on booting as if its request had taken a
// moment longer. A machine QEMU cannot save (a device that does not
// migrate) is recorded as such: the guests after it start cold and say
// why.
func (g *Guest) saveWarm(w warmStart) {
	firmware := time.Since(g.Start)
	g.saving.Lock()
	defer g.saving.Unlock()
	if g.saveEnded {
		return // closed: endSave gave it up
	}
	g.mu.Lock()
	proc, con := g.proc, g.con
	g.mu.Unlock()
	defer func() {
		// The frames go on to the lab, unless the guest is gone.
		if proc != nil {
			select {
			case <-proc.Exited():
				return
			default:
			}
		}
		g.port.Release()
	}()
	for i := 0; proc == nil || con == nil; i++ {
		// The first request can come before launch has recorded the
		// process (it is read from the socket at once).
		if i > 500 {
			g.gaveUp(w, "its QEMU was not recorded as started")
			return
		}
		time.Sleep(10 * time.Millisecond)
		g.mu.Lock()
		proc, con = g.proc, g.con
		g.mu.Unlock()
	}
	switch {
	case g.port.HoldOverflowed():
		g.gaveUp(w, fmt.Sprintf("it sent %d frames without asking the network for anything", netfab.MaxHeld))
		return
	case g.typed.Load():
		g.gaveUp(w, "its console was typed on before its first request on the network")
		return
	}
	meta := warm.Meta{Machine: g.Profile.Name(), QEMU: qemu.Version(g.Profile.Arch), Firmware: firmware}
	err := proc.SaveState(w.maker.StatePath(), saveTimeout)
	switch {
	case errors.Is(err, qemu.ErrCannotSave):
		w.maker.Cannot(meta, err.Error())
		g.setWarm("cold: QEMU cannot save this machine, its guests start cold: " + err.Error())
	case err != nil:
		g.gaveUp(w, err.Error())
	case g.typed.Load():
		g.gaveUp(w, "its console was typed on before its first request on the network")
	default:
		if err = w.maker.Save(meta, settled(con), g.port.Held()); err != nil {
			g.gaveUp(w, err.Error())
		} else {
			g.setWarm(fmt.Sprintf("saved: started from reset and saved at its first request on the network, after %.1fs, for the guests after it (snapshot %s)", firmware.Seconds(), w.key))
		}
	}
	if err := proc.Cont(); err != nil {
		select {
		case <-proc.Exited(): // closed meanwhile: its verdict is another's
		default:
			g.decide(Verdict{Reason: failure.QEMUFailed, Stage: timeline.Firmware, Detail: "the machine did not run on after it was saved: " + err.Error()})
		}
	}
}

// gaveUp records that the guest's machine is not saved, and why.
func (g *Guest) gaveUp(w warmStart, why string) {
	if w.maker.Abandon(why) {
		g.setWarm("cold: started from reset to be saved, and not saved: " + why)
	}
}

// endSave, at Close, waits for a save under way and gives up one that has
// not begun (the guest ended before its first request on the network).
func (g *Guest) endSave() {
	g.saving.Lock()
	g.saveEnded = true
	g.saving.Unlock()
	g.mu.Lock()
	maker := g.warmMaker
	g.mu.Unlock()
	if maker != nil {
		g.gaveUp(warmStart{maker: maker}, "it ended before its firmware's first request on the network")
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
