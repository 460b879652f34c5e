"""`make bench`: vhost-pv beside qemu-storage-daemon, same file, same guest, same run."""
