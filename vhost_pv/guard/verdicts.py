"""What the end of an owner container was: stopped, crashed, deleted or a clean exit, from
the evidence the watchers gathered (the README's table of container events). Plain data
and one pure function, so the rule is tested without an engine.

No single event carries the answer. Podman 4.3 reports `podman stop -t 1`, `podman rm -f`
and `kill -9` of the init alike as `died` with exit code 137, and the kernel's process
event for the init comes before any of them. What tells them apart:

- a removal (`remove`/`destroy`, or the engine no longer knows the container): deleted,
  whoever heard the exit first and whether or not a stop came before it;
- an `oom` event or the engine's State.OOMKilled: a crash;
- a stop asked of the engine: a `stop`/`kill` event (Docker sends `kill` then `die` then
  `stop`; Podman sends `stop` before `died` only when its stop wins a race against the
  container's cleanup process), or the container seen in state "stopping" (Podman holds that
  state for the whole stop timeout, and forgets it once the container has exited; its
  inspect has no field saying a stop was asked). Not a crash;
- otherwise exit code 0 is a clean exit and anything else (a code, a signal) a crash.
"""

from __future__ import annotations

import dataclasses
import enum
import signal as signals


class ExitKind(enum.Enum):
    CLEAN = "clean"  # exit code 0: the volume stays attached
    STOPPED = "stopped"  # a stop asked of the engine: the volume stays attached
    CRASHED = "crashed"  # the volume turns dangling: container-crashed
    DELETED = "deleted"  # the volume turns dangling: container-deleted


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What was seen of one container's end, by the engine and the kernel."""

    exit_code: int | None = None  # the engine's (128+N: killed by signal N); None if unknown
    signal: int = 0  # the kernel's terminating signal, when the process exit was heard there
    removed: bool = False  # a remove/destroy event, or the engine no longer knows the container
    oom: bool = False  # an oom event, or the engine's State.OOMKilled
    stop: str = ""  # how a stop asked of the engine was seen ("" if it was not)


@dataclasses.dataclass(frozen=True)
class Verdict:
    kind: ExitKind
    text: str  # for alerts and logs: "stopped by the engine (...)", "crashed (exit 137, killed by SIGKILL)"

    @property
    def flips(self) -> bool:
        return self.kind in (ExitKind.CRASHED, ExitKind.DELETED)


def classify(evidence: Evidence) -> Verdict:
    if evidence.removed:
        return Verdict(ExitKind.DELETED, "deleted")
    if evidence.oom:
        return Verdict(ExitKind.CRASHED, "crashed (out of memory)")
    if evidence.stop:
        return Verdict(ExitKind.STOPPED, f"stopped by the engine ({evidence.stop})")
    if evidence.signal:
        return Verdict(ExitKind.CRASHED, f"crashed (killed by {signal_name(evidence.signal)})")
    if evidence.exit_code == 0:
        return Verdict(ExitKind.CLEAN, "exited cleanly")
    if evidence.exit_code is None:
        return Verdict(ExitKind.CRASHED, "crashed (exit code unknown)")
    code = evidence.exit_code
    if 128 < code <= 128 + 64:  # a shell's and the engines' way to say "killed by signal N"
        return Verdict(ExitKind.CRASHED, f"crashed (exit {code}, killed by {signal_name(code - 128)})")
    return Verdict(ExitKind.CRASHED, f"crashed (exit {code})")


def signal_name(number: int) -> str:
    try:
        return signals.Signals(number).name
    except ValueError:
        return f"signal {number}"
