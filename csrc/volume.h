/*
 * volume.h: the per-volume object shared by every connection's queues (internal to csrc/).
 */
#ifndef VHOST_PV_VOLUME_H
#define VHOST_PV_VOLUME_H

#include <pthread.h>
#include <stddef.h>
#include <sys/uio.h>

#include "vhost_pv.h"
#include "vpv_ring.h"
#include "vring.h"

struct vpv_volume {
    int fd;
    struct vpv_volume_config cfg;
    uint32_t *state;              /* live state word in the mmap'd header page */
    void *state_map;
    size_t state_map_len;
    pthread_rwlock_t flip_lock;   /* read: a round of requests; write: a state flip */
    uint32_t inflight_writes;     /* data writes submitted to an io_uring, not completed */
    int writeback_failed;         /* a FLUSH's fdatasync failed: every later FLUSH fails (blk_io.c) */
    uint32_t abandoned_workers;   /* blk_worker.c workers a stop gave up on, still running:
                                   * they use this volume, so vpv_volume_close leaves it allocated */
    pthread_mutex_t ring_lock;
    struct vpv_ring_super super;  /* cached; written back by vpv_volume_ring_sync */
    int super_dirty;
    uint8_t *bounce;              /* record header + payload copied out of guest memory */
    size_t bounce_size;
    pthread_mutex_t event_lock;
    struct vpv_dangling_event *events;
    uint32_t event_first;
    uint32_t event_count;
    uint64_t events_lost;
    int event_fd;
};

uint64_t vpv_now_ns(void);
void vpv_volume_begin_request(struct vpv_volume *vol);
void vpv_volume_end_request(struct vpv_volume *vol);
void vpv_volume_post_event(struct vpv_volume *vol, const struct vpv_dangling_event *ev);
/* Append one record; returns 0, -ENOSPC (full, reject policy), -E2BIG (larger than the
 * ring) or another negative errno (a full file system under the ring: -EIO). */
int vpv_volume_ring_append(struct vpv_volume *vol, uint16_t type, uint16_t queue, uint32_t source,
                           uint64_t sector, uint32_t length, const struct iovec *iov, uint32_t n,
                           size_t payload_len, uint64_t *seq_out);

#endif
