"""The data-path workers' system call filter (csrc/seccomp.c), as the control plane sees it.

Each queue worker thread installs the filter on itself when it starts, before it looks at
guest memory; the event loop's thread is never filtered. The mode is process-wide and
applies to workers started after it is set: the daemon sets it once, before serving.
"""

from __future__ import annotations

import enum
import logging
import os

from vhost_pv._native import lib

ENV = "VHOST_PV_SECCOMP"
"""The environment variable that chooses `serve --seccomp`'s default (debugging a unit)."""


class SeccompMode(enum.Enum):
    KILL = "kill"
    """A forbidden system call ends the daemon (SIGSYS, a core dump, an audit record)."""
    LOG = "log"
    """It is allowed and the kernel logs it (audit / kernel log: type=1326): for finding
    what a new code path needs."""
    OFF = "off"
    """No filter (the daemon logs a warning)."""


_NATIVE = {
    SeccompMode.KILL: lib.VPV_SECCOMP_KILL,
    SeccompMode.LOG: lib.VPV_SECCOMP_LOG,
    SeccompMode.OFF: lib.VPV_SECCOMP_OFF,
}


def default_mode() -> SeccompMode:
    """kill, unless $VHOST_PV_SECCOMP names another mode (ValueError if it is not one)."""
    value = os.environ.get(ENV, "").strip().lower()
    return SeccompMode(value) if value else SeccompMode.KILL


def apply(mode: SeccompMode) -> None:
    """Build the filter for workers started from now on; OSError if the kernel or libseccomp
    cannot (the daemon must not serve with less than it was asked for)."""
    rc = int(lib.vpv_seccomp_set_mode(_NATIVE[mode]))
    if rc < 0:
        raise OSError(-rc, f"cannot build the data path's seccomp filter ({mode.value}): "
                      f"{os.strerror(-rc)}")


def current() -> SeccompMode:
    """The mode the next worker starts with."""
    native = int(lib.vpv_seccomp_mode())
    return next(mode for mode, value in _NATIVE.items() if value == native)


def log_mode(log: logging.Logger, mode: SeccompMode) -> None:
    """The start-up line that says how the data path is confined."""
    if mode is SeccompMode.KILL:
        log.info("seccomp: data-path workers confined to their allow-list; a forbidden system "
                 "call ends the daemon (SIGSYS)")
    elif mode is SeccompMode.LOG:
        log.warning("seccomp: log mode: data-path workers' forbidden system calls are allowed and "
                    "logged by the kernel (audit type=1326), not stopped")
    else:
        log.warning("seccomp: off: data-path workers run unconfined")
