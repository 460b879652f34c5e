"""Where the daemon's files are by default, and the one place the control socket's path is
resolved from the environment.

The layout follows the service unit (contrib/systemd): sockets in /run/vhost-pv (the unit's
RuntimeDirectory), volumes in /var/lib/vhost-pv (its StateDirectory). An admin who runs the
daemon elsewhere sets VHOST_PV_CONTROL once instead of passing --control to every command.
"""

from __future__ import annotations

import os
from pathlib import Path

RUN_DIR = Path("/run/vhost-pv")
"""The vhost-user sockets and the control socket."""
STATE_DIR = Path("/var/lib/vhost-pv")
"""Volume files."""
DEFAULT_CONTROL = RUN_DIR / "control.sock"
CONTROL_ENV = "VHOST_PV_CONTROL"


def control_path() -> str:
    """The control socket every command uses without --control: $VHOST_PV_CONTROL if set and
    not empty, else /run/vhost-pv/control.sock. A string: argparse checks and converts
    defaults given as strings with the option's type, so a bad variable is a usage error."""
    return os.environ.get(CONTROL_ENV) or str(DEFAULT_CONTROL)
