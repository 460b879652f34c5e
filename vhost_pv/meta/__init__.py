"""The metadata plane: what a VM may learn about itself (instance attributes, the state of
its volumes, guest-writable attributes, secrets).

store.py holds each VM's tree; http_server.py serves it over HTTP (relay.py is the guestfwd
relay QEMU runs to reach it); fuse.py serves it as a FUSE file system through the virtio-fs
device (vhost_pv/devices/fs.py), with per-application access rules from policy.py; agent.sh
is the guest's trusted agent.
"""
