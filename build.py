"""Builds vhost_pv._vhost_pv_native from csrc/ with cffi (API mode, out of line).

This is the only place with compiler flags, and csrc/vhost_pv.h is the only cdef source:
the Python side sees exactly what that header declares.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
HEADER = CSRC / "vhost_pv.h"
SOURCES = ["vring.c", "blk.c", "volume.c", "sha256.c", "loadgen.c", "fs.c"]
CFLAGS = ["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-pthread", "-fvisibility=hidden"]

# cdef understands "#define NAME <integer literal>" and nothing else of the preprocessor.
_INT_DEFINE = re.compile(r"^#define\s+\w+\s+(0x[0-9a-fA-F]+|\d+)\s*(/\*.*\*/)?\s*$")


def cdef_source(header: Path = HEADER) -> str:
    """The header as cffi's cdef accepts it: integer #defines stay, other directives go."""
    lines = []
    for line in header.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            if _INT_DEFINE.match(stripped):
                lines.append(re.sub(r"/\*.*\*/", "", stripped).rstrip())
            continue
        lines.append(line)
    return "\n".join(lines)


def make_builder() -> FFI:
    ffibuilder = FFI()
    ffibuilder.cdef(cdef_source())
    ffibuilder.set_source(
        "vhost_pv._vhost_pv_native",
        '#include "vhost_pv.h"',
        sources=[str(CSRC / name) for name in SOURCES],
        include_dirs=[str(CSRC)],
        extra_compile_args=CFLAGS,
        libraries=["pthread", "uring"],
    )
    return ffibuilder


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="vhost-pv-build-") as tmp:
        built = Path(make_builder().compile(tmpdir=tmp, verbose=False))
        target = ROOT / "vhost_pv" / built.name
        # Copy beside the target, then rename over it: a process that has the old library
        # mapped (a running daemon, a benchmark) keeps its pages; writing into the mapped
        # file in place would crash it.
        staging = target.with_name(target.name + ".new")
        shutil.copy2(built, staging)
        staging.replace(target)
    print(f"built {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
