"""vhost-pv: a vhost-user-blk backend whose volumes turn dangling when their container goes.

The product only: the daemon, its control plane and its CLI (vhost_pv/cli/). The tools around
it (load generator, QEMU guest harness, demo) are in vhost_pv_tools, which nothing here
imports. README.md, "Where things are", maps the folders.
"""

__version__ = "0.1.0"
