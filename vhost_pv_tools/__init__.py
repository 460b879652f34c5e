"""The tools around vhost-pv, not the product: the daemon and its client commands never import
this package.

- loadgen/: `vhost-pv loadgen`, a vhost-user-blk frontend with its own small cffi module;
- guest/: the QEMU (TCG) test guest: image, command line, job runner;
- serverproc.py: `vhost-pv serve` as a child process, for the tests, bench, fuzz and demo;
- demo.py: `vhost-pv demo`, a volume served to fio in a guest, end to end.
- guestmem.py: guest memory, split rings and virtio-blk requests from the driver's side,
  for the tests' fake frontend and the fuzzer.
"""
