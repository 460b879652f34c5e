"""`vhost-pv loadgen` and `vhost-pv demo`: the commands that hand off to the tools.

The tools live in vhost_pv_tools (installed beside vhost_pv), never in the product. Each
command imports its tool inside its function: these are the only imports of vhost_pv_tools
under vhost_pv/, and nothing else reaches this module unless one of the two is chosen
(tests/unit/test_layering.py checks both).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from vhost_pv.cli import EXIT_CHECK, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, render
from vhost_pv.cli.admin import control_problem
from vhost_pv.cli.argtypes import PID_MAX, int_in, seconds, size, socket_path

DEMO_SIZE = 256 << 20


def cmd_loadgen(args: argparse.Namespace) -> int:
    from vhost_pv_tools.loadgen import LoadgenError, run_loadgen

    try:
        result = run_loadgen(
            args.socket, args.rw, args.bs, args.iodepth, args.queues, args.runtime,
            verify=args.verify, backend_pid=args.pid, seed=args.seed, size=args.size,
            rwmix_read=args.rwmixread, event_idx=not args.no_event_idx,
        )
    except ValueError as exc:
        render.error(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        render.error(control_problem(Path(args.socket), exc))
        return EXIT_FAILED
    except LoadgenError as exc:
        render.error(f"{args.socket}: {exc}")
        return EXIT_FAILED
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if result.ok else EXIT_CHECK


def cmd_demo(args: argparse.Namespace) -> int:
    from vhost_pv_tools.demo import run_demo

    if args.size <= 0 or args.size % 512:
        render.error(f"--size {args.size}: the demo volume needs a positive multiple of 512 bytes")
        return EXIT_USAGE
    return run_demo(Path(args.workdir) if args.workdir else None, size=args.size)


def _loadgen(p: argparse.ArgumentParser) -> None:
    p.description = ("Drive a vhost-user-blk socket (vhost-pv, qemu-storage-daemon, any backend) "
                     "from the host as a frontend: IOPS, MiB/s, latency percentiles, the backend's "
                     "CPU per I/O. Exit 3 on I/O errors or verify mismatches.")
    p.epilog = """examples:
  vhost-pv loadgen --socket /run/vhost-pv/vol0.sock --rw randread --bs 4k --iodepth 32 --runtime 10
  vhost-pv loadgen --socket /run/vhost-pv/vol0.sock --rw randrw --queues 2 --verify --pid 4242"""
    p.add_argument("--socket", required=True, type=socket_path, metavar="PATH",
                   help="the backend's vhost-user socket")
    p.add_argument("--rw", choices=["randread", "randwrite", "read", "write", "randrw"],
                   default="randread", help="the access pattern (default %(default)s)")
    p.add_argument("--bs", type=size, default=4096, help="block size (default 4k)")
    p.add_argument("--iodepth", type=int_in(1, 256), default=32,
                   help="requests in flight per queue (default %(default)s)")
    p.add_argument("--queues", type=int_in(1, 16), default=1,
                   help="virtqueues, one thread each (default %(default)s)")
    p.add_argument("--runtime", type=seconds, default=10.0, metavar="S", help="seconds (default 10)")
    p.add_argument("--size", type=size, help="use only the first SIZE bytes of the disk")
    p.add_argument("--rwmixread", type=int_in(0, 100), default=50, help="randrw: percent reads (default 50)")
    p.add_argument("--verify", action="store_true", help="write patterns and check every read "
                   "(reads: prefill first; writes: read everything back after)")
    p.add_argument("--seed", type=int_in(0, (1 << 64) - 1),
                   help="random offsets and patterns (default: random)")
    p.add_argument("--no-event-idx", action="store_true", help="do not negotiate EVENT_IDX")
    p.add_argument("--pid", type=int_in(1, PID_MAX), help="the backend's pid: report its CPU time per I/O")
    p.add_argument("--json", action="store_true", help="the result as JSON")
    p.set_defaults(func=cmd_loadgen)


def _demo(p: argparse.ArgumentParser) -> None:
    p.description = ("Create a volume, serve it with `vhost-pv serve`, boot a small QEMU guest (TCG) "
                     "on it and run a verifying fio job, then print what the guest measured beside "
                     "what the backend counted. Needs the guest image (`make guest`).")
    p.epilog = """examples:
  vhost-pv demo
  vhost-pv demo --workdir /tmp/vhost-pv-demo --size 64M"""
    p.add_argument("--workdir", metavar="DIR", help="where the demo volume lives (default: the cache)")
    p.add_argument("--size", type=size, default=DEMO_SIZE, help="the demo volume's data size (default 256M)")
    p.set_defaults(func=cmd_demo)


COMMANDS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "loadgen": _loadgen,
    "demo": _demo,
}
"""Each subcommand's arguments, description and examples, added when it is chosen."""
