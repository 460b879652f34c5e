/*
 * blk_internal.h: what the three files of the virtio-blk data path share (internal to csrc/;
 * the cffi interface stays vhost_pv.h alone, nothing here is visible to Python).
 *
 * blk.c (the device and its requests), blk_io.c (the I/O engine: io_uring slots and the
 * synchronous fallback) and blk_worker.c (the queue worker thread and its lifecycle) all work
 * on the same per-queue and per-device state, declared once here with the functions that
 * cross from one file to another. Helpers small and hot enough that a call would show are
 * static inline here.
 */
#ifndef VHOST_PV_BLK_INTERNAL_H
#define VHOST_PV_BLK_INTERNAL_H

#include <pthread.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>

#include <liburing.h>

#include "virtio_blk.h"
#include "volume.h"
#include "vring.h"

#define STATUS_PENDING 0xff   /* execute(): the request went to the io_uring */

/* A request in flight on the io_uring: where its completion goes. */
struct async_slot {
    uint32_t next_free;       /* free list link (index) */
    uint16_t head;
    uint8_t *status_ptr;
    int write;
    uint32_t niov;
    uint64_t off;
    uint64_t len;
    struct iovec iov[VPV_SLOT_IOV];
};

struct vpv_queue {
    struct vpv_blk *blk;
    uint32_t index;
    int started;
    int kick_fd;
    int call_fd;
    int stop_fd;
    int has_thread;
    pthread_t thread;
    struct vpv_vring vr;
    struct vpv_queue_stats stats;
    struct vpv_chain chain;
    int coalescing;       /* recent wakes found several requests: wait after a kick */
    uint32_t wakes;
    struct io_uring uring;
    struct async_slot *slots; /* direct mode: VPV_ASYNC_SLOTS, else NULL (all synchronous) */
    uint32_t free_slot;       /* head of the free list, VPV_ASYNC_SLOTS when empty */
    uint32_t inflight;        /* slots in use */
    uint32_t unsubmitted;     /* prepared since the last io_uring_submit */
    int uring_efd;            /* eventfd the io_uring signals completions on, or -1 */
    uint16_t notify_checked_used; /* used->idx when notify() last looked */
    int in_round;             /* holds the volume's flip lock (read side): a fault releases it */
    int stopping;             /* vpv_blk_queue_stop is waiting: leave the passes, whatever is posted */
    int abandoned;            /* 1: the stop gave up waiting, the worker cleans up after itself;
                               * 2: the worker has left (set by the worker, under exchange) */
    int quarantined;          /* execute(): the request became a ring record (deferred push) */
    uint32_t ndeferred;
    struct deferred_push {    /* quarantined requests of the round, acknowledged at its end */
        uint16_t head;
        uint8_t status;
        uint8_t *status_ptr;
    } deferred[VPV_ASYNC_SLOTS];
    uint8_t *bounce;          /* a write's payload copied out of guest memory (dangling) */
    size_t bounce_size;
    /* Liveness (vpv_blk_queue_health), written by the worker only. */
    uint64_t heartbeats;      /* worker loop turns */
    uint64_t busy_since_ns;   /* coarse clock when the current request / wake-up began; 0 asleep */
    uint64_t uring_progress_ns; /* coarse clock of the last completion (or first submission) */
    uint64_t storage_since_ns; /* coarse clock when the worker entered a request's storage
                                * work (syscalls on the volume, the ring's mutex); 0 outside */
};

struct vpv_blk {
    struct vpv_volume *vol;    /* fd, regions, live state word, ring: shared per volume */
    int fd;                    /* vol->fd, kept here for the common path */
    int direct_fd;             /* O_DIRECT fd of the volume file, or -1 */
    int async_fd;              /* what the io_urings read and write: direct_fd, else fd */
    uint64_t data_offset;
    uint64_t capacity;
    uint32_t flags;
    uint32_t source;           /* connection id, recorded in ring records and events */
    uint8_t serial[VPV_SERIAL_BYTES];
    struct vpv_memory mem;
    int broken_fd;             /* eventfd: a queue broke, the control plane ends the connection */
    int refs;                  /* 1 (the control plane) + workers a stop gave up on */
    struct vpv_queue queues[VPV_MAX_QUEUES];
};

#define STAT_ADD(q, field, n) __atomic_fetch_add(&(q)->stats.field, (n), __ATOMIC_RELAXED)

/* The stop is waiting for the worker. A driver that posts requests as fast as they complete
 * would otherwise keep it in its passes (which only end when the ring is empty) forever, and
 * the stop joins the worker on the event loop. Unfinished requests stay in the ring:
 * last_avail_idx, which the stop returns, says where to resume. */
static inline int stopping(struct vpv_queue *q)
{
    return __atomic_load_n(&q->stopping, __ATOMIC_RELAXED);
}

/* The clock of the liveness fields: a vDSO read of a variable, no counter access. */
static inline uint64_t coarse_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Around the part of a request that waits on the volume's storage: a worker stuck there has
 * a stalled disk, not a broken daemon (vhost_pv/supervision.py tells the two apart). */
static inline void storage_enter(struct vpv_queue *q)
{
    __atomic_store_n(&q->storage_since_ns, coarse_ns(), __ATOMIC_RELAXED);
}

static inline void storage_leave(struct vpv_queue *q)
{
    __atomic_store_n(&q->storage_since_ns, 0, __ATOMIC_RELAXED);
}

/* Drop the first `skip` bytes of an iovec array in place; returns the new start. */
static inline struct iovec *iov_skip(struct iovec *iov, uint32_t *n, size_t skip)
{
    while (*n > 0 && skip >= iov->iov_len) {
        skip -= iov->iov_len;
        iov++;
        (*n)--;
    }
    if (*n > 0 && skip) {
        iov->iov_base = (uint8_t *)iov->iov_base + skip;
        iov->iov_len -= skip;
    }
    return iov;
}

/* -- blk.c: the device and its requests ------------------------------------------------ */

void blk_unref(struct vpv_blk *blk);
void blk_report_broken(struct vpv_queue *q);
void blk_complete(struct vpv_queue *q, uint16_t head, uint8_t *status_ptr, uint8_t status,
                  uint32_t written);
int blk_process_ring(struct vpv_queue *q);

/* -- blk_io.c: the I/O engine ---------------------------------------------------------- */

int blk_rw_full(int fd, struct iovec *iov, uint32_t n, off_t off, size_t total, int write);
int blk_data_rw(struct vpv_queue *q, struct iovec *iov, uint32_t n, off_t off, size_t len, int write);
uint8_t blk_flush_file(struct vpv_blk *blk);
struct async_slot *blk_async_prepare(struct vpv_queue *q, struct iovec *iov, uint32_t n, off_t off,
                                     size_t len, int write);
void blk_async_submit(struct vpv_queue *q);
uint32_t blk_async_reap(struct vpv_queue *q, uint32_t wait);
void blk_async_abandon(struct vpv_queue *q);
void blk_async_drain(struct vpv_queue *q);
void blk_async_setup(struct vpv_queue *q);
void blk_async_teardown(struct vpv_queue *q);

/* -- blk_worker.c: the queue worker ----------------------------------------------------- */

void blk_worker_init(void);

#endif
