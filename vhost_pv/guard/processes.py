"""Processes as the container watchers see them: an exit's wait status, and a pid's start
time, which tells a process from a later one that reused its pid. Plain /proc reading: the
kernel's process events themselves are in procevents.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class ProcessExit:
    pid: int
    status: int  # the wait status: exit code in bits 8-15, terminating signal in bits 0-6

    @property
    def exit_code(self) -> int:
        return (self.status >> 8) & 0xFF

    @property
    def signal(self) -> int:
        return self.status & 0x7F

    @property
    def clean(self) -> bool:
        return self.status == 0

    def describe(self) -> str:
        if self.signal:
            return f"killed by signal {self.signal}"
        return f"exited with code {self.exit_code}"


def pid_start_ticks(pid: int) -> int | None:
    """When a process started, in clock ticks since boot (/proc/PID/stat field 22), or None
    if there is no such process. With the pid it names one process for good: a pid that was
    reused after the owner exited has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])
