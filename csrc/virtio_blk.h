/*
 * virtio_blk.h: virtio-blk facts (virtio 1.x, section 5.2 "Block Device") for the C side,
 * included by blk.c (the device) and loadgen.c (the driver). Not part of the cffi interface.
 *
 * The Python declaration of the same numbers is vhost_pv/virtio/blk.py;
 * tests/test_c_headers.py compiles a program against this header and checks both agree.
 * Limits the Python side reads through cffi (VPV_SEG_MAX, VPV_MAX_DISCARD_SEGMENTS,
 * VPV_SECTOR_SIZE) stay in vhost_pv.h.
 */
#ifndef VHOST_PV_VIRTIO_BLK_H
#define VHOST_PV_VIRTIO_BLK_H

#include <stdint.h>

/* Request types (the type field of the request header). */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13

/* Status values (the last byte of a request, written by the device). */
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

/* Discard segment flag of WRITE_ZEROES: the range may be deallocated. */
#define VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP 1

/* Feature bits (bit numbers). */
#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_GEOMETRY 4
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_TOPOLOGY 10
#define VIRTIO_BLK_F_CONFIG_WCE 11
#define VIRTIO_BLK_F_MQ 12
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14

/* Largest DISCARD / WRITE_ZEROES segment we accept, in sectors (offered in the config space
 * as max_discard_sectors and max_write_zeroes_sectors). */
#define VPV_MAX_DISCARD_SECTORS (1u << 22)

/* struct virtio_blk_outhdr: what every request starts with. */
struct blk_req_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

/* struct virtio_blk_discard_write_zeroes: the payload of DISCARD and WRITE_ZEROES. */
struct blk_discard_segment {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

/* The config space up to write_zeroes_may_unmap (struct virtio_blk_config, packed as in
 * linux/virtio_blk.h). The device builds it in Python; declared here for the layout check. */
struct vpv_blk_config {
    uint64_t capacity;
    uint32_t size_max;
    uint32_t seg_max;
    uint16_t cylinders;
    uint8_t heads;
    uint8_t sectors;
    uint32_t blk_size;
    uint8_t physical_block_exp;
    uint8_t alignment_offset;
    uint16_t min_io_size;
    uint32_t opt_io_size;
    uint8_t writeback;
    uint8_t unused0;
    uint16_t num_queues;
    uint32_t max_discard_sectors;
    uint32_t max_discard_seg;
    uint32_t discard_sector_alignment;
    uint32_t max_write_zeroes_sectors;
    uint32_t max_write_zeroes_seg;
    uint8_t write_zeroes_may_unmap;
    uint8_t unused1[3];
} __attribute__((packed));

#endif
