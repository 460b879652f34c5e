"""The one module that imports the compiled C data path (built by build.py from csrc/).

Everything else reaches C through the names exported here, so the rest of the package
never touches cffi objects it did not get from this module.
"""

from __future__ import annotations

try:
    from vhost_pv._vhost_pv_native import ffi, lib
except ImportError as exc:  # pragma: no cover - only when the build step was skipped
    raise ImportError(
        "the C data path is not built: run `make install` (or `python build.py`)"
    ) from exc

__all__ = ["ffi", "lib"]
