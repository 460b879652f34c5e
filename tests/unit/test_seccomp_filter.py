"""The data-path workers' seccomp filter (csrc/seccomp.c) meets a forbidden system call.

vpv_seccomp_selftest() starts a thread that installs exactly the filter the queue workers
install and then calls socket(2), which the data path never makes: what a compromised worker
would try first. Each case runs in a child interpreter, since the kill action ends the whole
process (and the mode is process-wide).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from vhost_pv.seccomp import ENV, SeccompMode, default_mode


def _child(body: str) -> subprocess.CompletedProcess[str]:
    # SIGSYS dumps core by default: none from a test, wherever cores are enabled.
    code = ("import resource\nresource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
            "from vhost_pv._native import lib\n" + textwrap.dedent(body))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize("configure", [
    "assert lib.vpv_seccomp_set_mode(lib.VPV_SECCOMP_KILL) == 0",
    "pass",   # never configured: the C default is kill too
])
def test_a_filtered_thread_calling_socket_ends_the_process_with_sigsys(configure: str) -> None:
    child = _child(f"""
        {configure}
        print("before", flush=True)
        print("survived", lib.vpv_seccomp_selftest(), flush=True)
    """)
    assert child.returncode == -signal.SIGSYS, (child.returncode, child.stdout, child.stderr)
    assert child.stdout == "before\n"


def test_log_mode_lets_the_call_through_and_the_calling_thread_stays_unfiltered() -> None:
    child = _child("""
        import socket
        assert lib.vpv_seccomp_set_mode(lib.VPV_SECCOMP_LOG) == 0
        assert lib.vpv_seccomp_mode() == lib.VPV_SECCOMP_LOG
        print(lib.vpv_seccomp_selftest())
        # The filter was the selftest thread's alone (no TSYNC): this one is free.
        with open("/proc/thread-self/status") as status:
            print([line.split()[1] for line in status if line.startswith("Seccomp:")][0])
        socket.socket(socket.AF_UNIX).close()
        assert lib.vpv_seccomp_set_mode(lib.VPV_SECCOMP_OFF) == 0
        print(lib.vpv_seccomp_selftest())
    """)
    assert child.returncode == 0, child.stderr
    # socket() allowed (1) under log and off; the main thread in seccomp mode 0 (none).
    assert child.stdout.split() == ["1", "0", "1"]


def test_an_unknown_mode_is_refused() -> None:
    child = _child("print(lib.vpv_seccomp_set_mode(7), lib.vpv_seccomp_mode() == lib.VPV_SECCOMP_KILL)")
    assert child.stdout.split() == ["-22", "True"]


def test_the_default_mode_is_kill_unless_the_environment_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert default_mode() is SeccompMode.KILL
    monkeypatch.setenv(ENV, "log")
    assert default_mode() is SeccompMode.LOG
    monkeypatch.setenv(ENV, "bogus")
    with pytest.raises(ValueError):
        default_mode()
