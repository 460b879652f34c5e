"""The metadata plane: what a VM may learn about itself (instance attributes, the state of
its volumes, guest-writable attributes, secrets), served over HTTP and, later, virtio-fs."""
