#!/usr/bin/env bash
# `make asan`: run the given command against the ASan + UBSan build of the C data path
# (`python build.py --sanitize`, in build/asan/). Daemon subprocesses inherit all of it.
# Fails if the command fails or if any sanitizer report was written, even by a process whose
# exit status nobody looked at.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
module=$(ls "$root"/build/asan/_vhost_pv_native*.so 2>/dev/null | head -1)
if [ -z "$module" ]; then
    echo "run-sanitized: no build/asan/_vhost_pv_native*.so: run python build.py --sanitize" >&2
    exit 1
fi
libasan=$(gcc -print-file-name=libasan.so)
if [ ! -e "$libasan" ]; then
    echo "run-sanitized: gcc has no libasan.so (Debian: libasan8)" >&2
    exit 1
fi
reports="$root/build/asan/reports"
rm -rf "$reports"
mkdir -p "$reports"
# detect_leaks=0: CPython's own allocations at exit are not ours to judge.
export VHOST_PV_NATIVE="$module"
export LD_PRELOAD="$libasan"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:log_path=$reports/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$reports/ubsan"
status=0
"$@" || status=$?
unset LD_PRELOAD
if compgen -G "$reports/*" >/dev/null; then
    echo "run-sanitized: sanitizer reports:" >&2
    for report in "$reports"/*; do
        echo "== $report" >&2
        cat "$report" >&2
    done
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "run-sanitized: the command failed (exit $status) under the sanitizers" >&2
    exit "$status"
fi
echo "run-sanitized: no sanitizer reports" >&2
