"""`vhost-pv loadgen`: a vhost-user-blk *frontend* that drives any backend from the host.

The Python side (loadgen.py) does the vhost-user handshake and lays out the rings in a memfd;
csrc/loadgen.c, compiled by build.py into this package's own cffi module (_loadgen_native,
declared by csrc/loadgen.h), keeps the requests in flight. The daemon never imports this.
"""

from vhost_pv_tools.loadgen.loadgen import (
    LoadgenError,
    LoadgenResult,
    VerifyState,
    pattern,
    run_loadgen,
)

__all__ = ["LoadgenError", "LoadgenResult", "VerifyState", "pattern", "run_loadgen"]
