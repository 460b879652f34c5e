"""A seeded, time-bounded fuzzer for the daemon's vhost-user sockets and descriptor rings.

Run as `python -m fuzz --seed N --duration S` (or `make fuzz`). It starts `vhost-pv serve`
as a subprocess on a scratch volume and a bystander volume, then drives many connections
at the scratch volume: mutated handshakes (bad fields, request codes, sizes, fd counts and
kinds, truncated messages, closes mid-message) and valid set-ups followed by random
descriptor rings and kicks. After each connection the daemon must be alive, answer
`status` on its control socket within a second, and still serve a read on the bystander.

It lives outside the daemon package and never imports from tests/: the guest memory and
split-ring layout it needs come from vhost_pv_tools.guestmem, the tests' too (fuzz/guest.py
only makes them lenient to wrong values).
"""
