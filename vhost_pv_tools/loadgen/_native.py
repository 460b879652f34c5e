"""The one module that imports the load generator's compiled data path (csrc/loadgen.c).

build.py builds it apart from the daemon's vhost_pv._vhost_pv_native, from the cdef header
csrc/loadgen.h, so neither module carries the other's code.
"""

from __future__ import annotations

try:
    from vhost_pv_tools.loadgen._loadgen_native import ffi, lib
except ImportError as exc:  # pragma: no cover - only when the build step was skipped
    raise ImportError(
        "the load generator's C part is not built: run `make install` (or `python build.py`)"
    ) from exc

__all__ = ["ffi", "lib"]
