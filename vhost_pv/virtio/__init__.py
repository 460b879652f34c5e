"""Numbers fixed by the virtio specification, declared once for the whole project.

`blk` holds the virtio-blk device's facts (request types, status values, feature bits, the
config space layout, our per-request limits), `ring` the split virtqueue's. The device, the
load generator, the guard, the fuzzer and the tests import them from here; the C data path
declares the same numbers in csrc/virtio_blk.h and csrc/vring.h, and tests/unit/test_c_headers.py
compiles a program against those headers to check that both sides agree.
"""
