"""The product and its tools stay apart, and the client commands stay small.

- `vhost-pv --help` and the admin client commands (status, alerts, ...) load neither the
  daemon, nor the C data path (vhost_pv._native and its cffi module), nor the tools;
- nothing under vhost_pv/ imports vhost_pv_tools except the two command functions that hand
  off to it (vhost_pv/cli/tools.py), and those only inside the function;
- every subcommand and option has help text, and every subcommand an example epilog.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

from vhost_pv import cli

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: the test process itself has long imported everything.
_PROBE = """
import json, sys
from vhost_pv.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        codes.append(main(argv))
    except SystemExit as exc:  # --help and usage errors end in argparse's exit
        codes.append(exc.code)
heavy = ("vhost_pv._native", "vhost_pv._vhost_pv_native", "_cffi_backend", "vhost_pv.app",
         "vhost_pv_tools")
print(json.dumps({"codes": codes,
                  "loaded": sorted(m for m in sys.modules if m.startswith(heavy))}))
"""


def _probe(tmp_path: Path, *argvs: list[str]) -> dict[str, list[object]]:
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argvs)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result: dict[str, list[object]] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_client_commands_do_not_load_the_data_path(tmp_path: Path) -> None:
    control = str(tmp_path / "missing.sock")
    result = _probe(
        tmp_path,
        ["--help"],
        ["status", "--help"],
        ["status", "--control", control],
        ["status", "--control", control, "--json"],
        ["ls", "--control", control],
        ["alerts", "--control", control],
        ["ioctl", "--control", control, "Persistent_Disk_Dangling", "vol0"],
        ["reclaim", "--control", control, "vol0", "--owner", "c2"],
        ["ring-ctl", "--control", control, "list", "vol0"],
        ["meta", "ls", "--control", control, "vm0"],
        ["delete", "--control", control, "vol0"],
        ["set", "--help"],
        ["set", "--control", control, "vol0", "--ttl", "1h", "--read-policy", "zeros", "--uids", "0"],
        ["set", "--control", control, "vol0", "--no-owner", "--json"],
    )
    # Help exits 0; every client reports the missing daemon with exit 1.
    assert result["codes"] == [0, 0] + [cli.EXIT_FAILED] * 9 + [0] + [cli.EXIT_FAILED] * 2
    assert result["loaded"] == []


def test_the_probe_sees_the_data_path_when_it_is_loaded(tmp_path: Path) -> None:
    """The check above can fail: an offline volume command does load the C data path."""
    result = _probe(tmp_path, ["inspect", str(tmp_path / "missing.img")])
    assert result["codes"] == [cli.EXIT_FAILED]
    assert "vhost_pv._native" in result["loaded"]
    # So does the offline form of `set` (on a file, no daemon).
    result = _probe(tmp_path, ["set-file", str(tmp_path / "missing.img"), "--ttl", "1h"])
    assert result["codes"] == [cli.EXIT_FAILED]
    assert "vhost_pv._native" in result["loaded"]
    assert not any(str(m).startswith("vhost_pv_tools") for m in result["loaded"])


def _tool_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, inside a function) of every import of vhost_pv_tools in one source file."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            if any(name == "vhost_pv_tools" or name.startswith("vhost_pv_tools.") for name in names):
                assert isinstance(child, ast.Import | ast.ImportFrom)
                found.append((child.lineno, in_function))
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(tree, False)
    return found


def test_the_product_does_not_import_the_tools() -> None:
    allowed = ROOT / "vhost_pv" / "cli" / "tools.py"
    problems = []
    for path in sorted((ROOT / "vhost_pv").rglob("*.py")):
        for line, in_function in _tool_imports(path):
            if path != allowed or not in_function:
                problems.append(f"{path.relative_to(ROOT)}:{line}")
    assert problems == []
    # The hand-off itself is there: the check above looks at the right kind of statement.
    assert [in_function for _, in_function in _tool_imports(allowed)] == [True, True]


def test_every_subcommand_and_option_has_help_and_examples() -> None:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {action.dest: action.help for action in subparsers._choices_actions}
    assert [name for name, _, _ in cli.COMMANDS] == list(subparsers.choices)
    for name, sub in subparsers.choices.items():
        help_text = sub.format_help()  # adds the command's arguments
        assert summaries[name], name
        assert sub.description, name
        assert sub.epilog and sub.epilog.startswith("examples:\n"), name
        assert f"vhost-pv {name} " in sub.epilog, name
        # The epilog's command lines are printed as written, not re-wrapped.
        assert sub.epilog.splitlines()[1] in help_text, name
        for action in sub._actions:
            assert action.help, f"vhost-pv {name}: {action.option_strings or action.dest} has no help"
