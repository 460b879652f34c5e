"""vhost-user itself, independent of any device.

messages.py declares every message layout once; channel.py reads and writes messages with
their fds on a unix socket; session.py is the backend's state machine, which validates every
message before a device sees it; frontend.py is a blocking frontend (the side QEMU plays),
used by the load generator and the tests.
"""
