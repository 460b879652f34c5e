"""The control socket: how admins and the CLI command a running daemon.

wire.py declares every request and reply layout once (csrc/vpv_control.h mirrors it, checked by
tests/unit/test_c_headers.py); server.py accepts peers on the allow-list (SO_PEERCRED), checks each
frame and dispatches the command; client.py is the blocking client `vhost-pv status`, `ioctl`,
`reclaim`, ... use.
"""
