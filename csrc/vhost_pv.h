/*
 * vhost_pv.h: the one interface between the Python control plane and the C data path.
 *
 * build.py feeds this file to cffi's cdef (lines starting with '#' other than integer
 * #defines are dropped first), so it must stay within what cdef parses: plain structs,
 * opaque structs, integer #defines and prototypes.
 */
#ifndef VHOST_PV_H
#define VHOST_PV_H
#include <stdint.h>

/* Limits the device advertises and the hot path enforces. */
#define VPV_MAX_REGIONS 8
#define VPV_MAX_QUEUES 16
#define VPV_MAX_QUEUE_SIZE 1024
/* Segments per request we advertise (seg_max); one more for the header, one for status. */
#define VPV_SEG_MAX 126
/* Host iovecs one request may use after splitting descriptors at region borders. */
#define VPV_MAX_IOV 1024
#define VPV_MAX_DISCARD_SEGMENTS 16
#define VPV_SECTOR_SIZE 512
#define VPV_SERIAL_BYTES 20

/* Volume state word values (mirrors vhost_pv.volume.header.VolumeState). */
#define VPV_STATE_ATTACHED 1
#define VPV_STATE_DANGLING 2

/* Flags for vpv_blk_new. */
#define VPV_BLK_READ_ONLY 1

/* One region of the frontend's memory as sent in SET_MEM_TABLE / ADD_MEM_REG. */
struct vpv_mem_region_desc {
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t mmap_offset;
    int fd;
};

/* What the control plane knows of one virtqueue when it starts it. */
struct vpv_vring_config {
    uint32_t num;
    uint16_t base;          /* last_avail_idx to resume from (SET_VRING_BASE) */
    uint16_t event_idx;     /* VIRTIO_RING_F_EVENT_IDX negotiated */
    uint16_t indirect;      /* VIRTIO_RING_F_INDIRECT_DESC negotiated */
    uint64_t desc_user_addr;
    uint64_t avail_user_addr;
    uint64_t used_user_addr;
    int kick_fd;            /* -1: no kick fd, the queue is processed on vpv_blk_queue_process */
    int call_fd;            /* -1: no interrupts */
};

/* Counters of one virtqueue, read by `vhost-pv status`. */
struct vpv_queue_stats {
    uint64_t requests;
    uint64_t reads;
    uint64_t writes;
    uint64_t flushes;
    uint64_t discards;
    uint64_t write_zeroes;
    uint64_t get_ids;
    uint64_t unsupported;
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t io_errors;       /* requests completed with VIRTIO_BLK_S_IOERR */
    uint64_t bad_requests;    /* malformed chains or requests (subset of io_errors or no status) */
    uint64_t kicks;
    uint64_t notifications;
    uint16_t last_avail_idx;
    uint16_t running;
    uint16_t broken;          /* the ring itself was corrupt; the queue stopped */
    uint16_t _pad;
};

struct vpv_blk;

/* Create a block device over an open volume fd. The state word at header_state_offset is
 * mmap'd and read on every request. Returns NULL and sets *err to a negative errno. */
struct vpv_blk *vpv_blk_new(int volume_fd, uint64_t data_offset, uint64_t capacity_bytes,
                            uint64_t header_state_offset, uint32_t flags,
                            const uint8_t *serial, int *err);
/* Stops every queue, unmaps memory and frees the device. Does not close volume_fd. */
void vpv_blk_free(struct vpv_blk *blk);

/* Replace the memory table (all queues must be stopped). The fds are not kept: the caller
 * closes them. Returns 0 or a negative errno; on error the table is empty. */
int vpv_blk_set_memory(struct vpv_blk *blk, const struct vpv_mem_region_desc *regions,
                       uint32_t count);

/* Start a queue: with a kick fd a worker thread serves it until vpv_blk_queue_stop.
 * Returns 0 or a negative errno (-EFAULT: ring addresses are outside the memory table). */
int vpv_blk_queue_start(struct vpv_blk *blk, uint32_t index, const struct vpv_vring_config *cfg);
/* Stop a queue and wait for its worker; returns last_avail_idx (>= 0) or a negative errno. */
int vpv_blk_queue_stop(struct vpv_blk *blk, uint32_t index);
/* Process what is available on a started queue in the calling thread (no GIL needed).
 * Returns the number of requests completed, or a negative errno if the ring is broken. */
int vpv_blk_queue_process(struct vpv_blk *blk, uint32_t index);
int vpv_blk_queue_stats(struct vpv_blk *blk, uint32_t index, struct vpv_queue_stats *out);

#endif
