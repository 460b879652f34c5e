"""The vhost-user device backends behind a session.

blk.py is the virtio-blk device (features, config space, one C data path per connection);
fs.py the virtio-fs device that serves the metadata file system; native_ring.py turns a
session's memory table and ring setup into the C structs of csrc/vhost_pv.h.
"""
