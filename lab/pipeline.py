"""The UP and DOWN phase lists, as data, and the runner that walks them.

The full ordered lists live here and nowhere else (kind: ``create.go`` builds its ``actionsToRun``); the phase
protocol itself (Phase, Context, Log) is the leaf module ``lab.phase``.
"""
from __future__ import annotations

import time
import traceback
from typing import Iterable

from lab.errors import LabError, PhaseError
from lab.phase import Context, Phase
from lab.phases import (cilium, down, image, join, kubeadm, kubeconfig, metallb, network, nodes, preflight, ready,
                        runtime, storage, tune, wait)

#: `lab up`, in order. The CNI goes in between init and join, as kubeadm documents it and kind does it: the control
#: plane's Cilium agent compiles its datapath before any worker's does, instead of all of them at once (under TCG on
#: two host cores the concurrent compiles starved the API server).
UP: tuple[type[Phase], ...] = (
    preflight.Preflight, image.Image, network.Network, storage.Storage, nodes.Nodes, wait.Wait, tune.Tune,
    runtime.Runtime, kubeadm.Kubeadm, cilium.Cilium, join.Join, metallb.Metallb, ready.Ready, kubeconfig.Kubeconfig,
)

#: `lab down`, in order: the objects `up` made, found by ownership metadata, removed in reverse.
DOWN: tuple[type[Phase], ...] = (down.Domains, down.NetworkDown, down.PoolDown, down.StateDown)


def run_phases(ctx: Context, phases: Iterable[Phase], until: str | None = None) -> dict[str, dict]:
    """Run phases in order; skip those that do not apply or are already done; stop after ``until``.

    Records each phase's status and seconds in the state (``phases``) and returns that record.
    A failure is re-raised as a LabError whose message names the phase.
    """
    record: dict[str, dict] = {}
    started = time.monotonic()
    for phase in phases:
        reason = phase.skip_reason(ctx)
        t0 = time.monotonic()
        if reason:
            ctx.log.phase("-", phase.name, f"skipped: {reason}")
            record[phase.name] = {"status": "skipped", "seconds": 0.0, "reason": reason}
        elif phase.done(ctx):
            ctx.log.phase("=", phase.name, "already done")
            record[phase.name] = {"status": "unchanged", "seconds": round(time.monotonic() - t0, 3)}
        else:
            try:
                phase.run(ctx)
            except LabError as exc:
                _record(ctx, record, phase.name, "failed", t0)
                ctx.log.phase("x", phase.name, f"failed after {time.monotonic() - t0:.1f}s")
                exc.message = f"phase {phase.name}: {exc.message}"
                raise
            except KeyboardInterrupt:
                _record(ctx, record, phase.name, "interrupted", t0)
                ctx.log.phase("x", phase.name, "interrupted")
                raise
            except Exception as exc:  # an unexpected bug: keep the traceback in the log file
                _record(ctx, record, phase.name, "failed", t0)
                ctx.log.debug(traceback.format_exc())
                ctx.log.phase("x", phase.name, f"failed after {time.monotonic() - t0:.1f}s")
                raise PhaseError(f"phase {phase.name}: unexpected {type(exc).__name__}: {exc}",
                                 hint=f"details in {ctx.log.path}") from exc
            seconds = time.monotonic() - t0
            ctx.log.phase("✓", phase.name, f"{seconds:.1f}s")
            record[phase.name] = {"status": "done", "seconds": round(seconds, 3)}
        _save_record(ctx, record)
        if until and phase.name == until:
            break
    record["_total"] = {"status": "done", "seconds": round(time.monotonic() - started, 3)}
    _save_record(ctx, record)
    return record


def _record(ctx: Context, record: dict, name: str, status: str, t0: float) -> None:
    record[name] = {"status": status, "seconds": round(time.monotonic() - t0, 3)}
    _save_record(ctx, record)


def _save_record(ctx: Context, record: dict) -> None:
    if ctx.state.exists():
        ctx.state.update(phases=record)


def up_phases() -> list[Phase]:
    return [phase() for phase in UP]


def down_phases() -> list[Phase]:
    return [phase() for phase in DOWN]


def phase_names(phases: Iterable[Phase]) -> list[str]:
    return [p.name for p in phases]
