"""The one module that imports the compiled C data path (built by build.py from csrc/).

Everything else reaches C through the names exported here, so the rest of the package
never touches cffi objects it did not get from this module.
"""

from __future__ import annotations

import os

_SANITIZED = os.environ.get("VHOST_PV_NATIVE")
"""A variant of the module to load instead (`make asan`: the ASan + UBSan build from
`python build.py --sanitize`); inherited by the daemon subprocesses the tests start."""

if _SANITIZED:
    import importlib.machinery
    import importlib.util
    import sys

    # Loaded under the normal module's name, so nothing else can tell the difference; a path
    # that does not exist is an error, never a silent fall-back to the unsanitized build.
    _loader = importlib.machinery.ExtensionFileLoader("vhost_pv._vhost_pv_native", _SANITIZED)
    _spec = importlib.util.spec_from_file_location("vhost_pv._vhost_pv_native", _SANITIZED, loader=_loader)
    if _spec is None or not os.path.exists(_SANITIZED):
        raise ImportError(f"VHOST_PV_NATIVE={_SANITIZED}: no such module (run `python build.py --sanitize`)")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["vhost_pv._vhost_pv_native"] = _module
    _loader.exec_module(_module)

try:
    from vhost_pv import _vhost_pv_native as _built
    from vhost_pv._vhost_pv_native import ffi, lib
except ImportError as exc:  # pragma: no cover - only when the build step was skipped
    raise ImportError(
        "the C data path is not built: run `make install` (or `python build.py`)"
    ) from exc

NATIVE_PATH: str = str(getattr(_built, "__file__", ""))
"""The file the C data path was loaded from."""

__all__ = ["ffi", "lib"]
