#!/bin/sh
# A guest with one vhost-pv disk. Start the backend first:
#   vhost-pv create /var/lib/vhost-pv/vol0.img --size 1G
#   vhost-pv serve --socket-dir /run/vhost-pv --control /run/vhost-pv/control.sock /var/lib/vhost-pv/vol0.img
# Under KVM add -accel kvm; this example uses TCG so it runs anywhere.
exec qemu-system-x86_64 \
    -machine q35 -accel tcg -cpu max -smp 2 -m 1024 \
    -object memory-backend-memfd,id=mem,size=1024M,share=on \
    -numa node,memdev=mem \
    -chardev socket,id=vol0,path=/run/vhost-pv/vol0.sock,reconnect=1 \
    -device vhost-user-blk-pci,chardev=vol0,num-queues=2 \
    -nographic "$@"
