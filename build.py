"""Builds the two cffi modules (API mode, out of line) from csrc/.

- vhost_pv._vhost_pv_native: the daemon's data path; csrc/vhost_pv.h is its only cdef source.
- vhost_pv_tools.loadgen._loadgen_native: the load generator's frontend data path
  (csrc/loadgen.c); csrc/loadgen.h is its only cdef source. A tool, so a module of its own:
  the daemon's module carries none of it.

This is the only place with compiler flags: the Python side sees exactly what each header
declares.

`python build.py --sanitize` builds an AddressSanitizer + UBSan variant of the daemon's module
into build/asan/ instead, leaving the normal modules alone; vhost_pv/_native.py loads it when
VHOST_PV_NATIVE names it (`make asan` does that, with libasan preloaded).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
HEADER = CSRC / "vhost_pv.h"
SOURCES = ["vring.c", "blk.c", "blk_io.c", "blk_worker.c", "volume.c", "sha256.c", "fs.c", "seccomp.c"]
LOADGEN_HEADER = CSRC / "loadgen.h"
LOADGEN_SOURCES = ["loadgen.c"]
LOADGEN_DIR = ROOT / "vhost_pv_tools" / "loadgen"
CFLAGS = ["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-pthread", "-fvisibility=hidden"]
# Any report ends the process: a sanitizer finding must fail the run, not scroll past.
SANITIZE_FLAGS = [
    "-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined",
]
SANITIZED_DIR = ROOT / "build" / "asan"

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


def make_builder(*, sanitize: bool = False) -> FFI:
    """The daemon's module: vhost_pv._vhost_pv_native."""
    ffibuilder = FFI()
    ffibuilder.cdef(cdef_source())
    ffibuilder.set_source(
        "vhost_pv._vhost_pv_native",
        '#include "vhost_pv.h"',
        sources=[str(CSRC / name) for name in SOURCES],
        include_dirs=[str(CSRC)],
        extra_compile_args=CFLAGS + (SANITIZE_FLAGS if sanitize else []),
        extra_link_args=SANITIZE_FLAGS if sanitize else [],
        libraries=["pthread", "uring", "seccomp"],
    )
    return ffibuilder


def make_loadgen_builder() -> FFI:
    """The load generator's module: vhost_pv_tools.loadgen._loadgen_native."""
    ffibuilder = FFI()
    ffibuilder.cdef(cdef_source(LOADGEN_HEADER))
    ffibuilder.set_source(
        "vhost_pv_tools.loadgen._loadgen_native",
        '#include "loadgen.h"',
        sources=[str(CSRC / name) for name in LOADGEN_SOURCES],
        include_dirs=[str(CSRC)],
        extra_compile_args=CFLAGS,
        libraries=["pthread"],
    )
    return ffibuilder


def _install(built: Path, target_dir: Path) -> Path:
    """Put a compiled module in place without disturbing processes that have it mapped."""
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / built.name
    # Copy beside the target, then rename over it: a process that has the old library
    # mapped (a running daemon, a benchmark) keeps its pages; writing into the mapped
    # file in place would crash it.
    staging = target.with_name(target.name + ".new")
    shutil.copy2(built, staging)
    staging.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sanitize", action="store_true",
                        help=f"ASan + UBSan build into {SANITIZED_DIR.relative_to(ROOT)}/ "
                        "(the normal module stays)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vhost-pv-build-") as tmp:
        built = Path(make_builder(sanitize=args.sanitize).compile(tmpdir=tmp, verbose=False))
        targets = [_install(built, SANITIZED_DIR if args.sanitize else ROOT / "vhost_pv")]
    if not args.sanitize:
        # A directory of its own, so no object file of one module can end up in the other.
        with tempfile.TemporaryDirectory(prefix="vhost-pv-build-loadgen-") as tmp:
            built = Path(make_loadgen_builder().compile(tmpdir=tmp, verbose=False))
            targets.append(_install(built, LOADGEN_DIR))
    for target in targets:
        print(f"built {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
