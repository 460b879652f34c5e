"""`python -m vhost_pv.cli`: the `vhost-pv` command without its console script."""

import sys

from vhost_pv.cli import main

sys.exit(main())
