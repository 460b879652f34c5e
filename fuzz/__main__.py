"""python -m fuzz --seed N --duration S: prints a JSON report; exit 1 on a death, a stall,
or fd/RSS growth beyond the bounds (exit 2 on a bad command line)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from fuzz.cases import ATTACKS
from fuzz.runner import Fuzzer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    parser.add_argument("--seed", type=int, default=1, help="everything follows from it (default 1)")
    parser.add_argument("--duration", type=float, default=60.0, metavar="S", help="seconds (default 60)")
    parser.add_argument("--connections", type=int, default=0,
                        help="stop after this many connections (replays a run exactly; "
                        "default: no limit)")
    parser.add_argument("--max-fd-growth", type=int, default=8, help="daemon fds allowed to leak (default 8)")
    parser.add_argument("--max-rss-growth", type=int, default=64, metavar="MIB",
                        help="daemon RSS growth allowed (default 64 MiB)")
    parser.add_argument("--skip", default="", metavar="ATTACKS",
                        help="leave these attack classes out (comma-separated: "
                        f"{', '.join(sorted(ATTACKS))})")
    parser.add_argument("--workdir", help="keep volumes and the daemon log here (default: a temporary dir)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.connections < 0:
        parser.error("--duration must be positive and --connections not negative")
    skip = frozenset(name for name in args.skip.split(",") if name)
    if skip - ATTACKS:
        parser.error(f"--skip: unknown attack classes {', '.join(sorted(skip - ATTACKS))}")

    def run(workdir: Path) -> int:
        fuzzer = Fuzzer(workdir, args.seed, args.duration, max_connections=args.connections,
                        max_fd_growth=args.max_fd_growth, max_rss_growth_kib=args.max_rss_growth << 10,
                        skip=skip)
        try:
            report = fuzzer.run()
        except KeyboardInterrupt:
            # run() has stopped the daemon on its way out: show how far it got.
            print(fuzzer.report.to_json(), flush=True)
            print(f"fuzz: seed {args.seed}: interrupted", file=sys.stderr)
            return 130
        print(report.to_json(), flush=True)
        if not report.ok:
            print(f"fuzz: seed {args.seed}: {report.failure and report.failure['problem']}", file=sys.stderr)
        return 0 if report.ok else 1

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        return run(Path(args.workdir))
    with tempfile.TemporaryDirectory(prefix="vhost-pv-fuzz-") as tmp:
        return run(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
