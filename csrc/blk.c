/*
 * blk.c: virtio-blk requests on a volume, one worker thread per virtqueue.
 *
 * The worker sleeps in poll() on the queue's kick eventfd and a stop eventfd, drains the
 * ring, does the I/O straight between the volume fd and guest memory (preadv/pwritev on
 * the translated iovecs, no bounce buffer), writes the status byte, publishes used
 * entries and interrupts the guest only when the driver asked for it (EVENT_IDX).
 * Python is never entered on this path.
 *
 * The ring is drained in rounds of at most VPV_ASYNC_SLOTS requests, each round under the
 * volume's flip lock (read side). Reads of the data region, and writes in direct mode
 * (O_DIRECT), go to the queue's io_uring and complete whenever the kernel finishes them,
 * while the worker goes on taking new requests: the file system and the device see the
 * driver's queue depth all the time, and one io_uring_enter submits a whole batch. Writes
 * through the page cache, and everything without an io_uring (or with VPV_BLK_SYNC_IO), are
 * done one by one with preadv/pwritev in the worker. A data write counts in the volume's in-flight writes from its submission (inside a
 * round, after the state check) to its completion, and a flip waits for that count to reach
 * zero, so no write that began before a flip lands after it returned.
 *
 * The frontend is not trusted: its call and kick eventfds are non-blocking (a full call
 * counter is an interrupt already pending), every pass over guest memory runs under the
 * SIGBUS guard (vring.h: memory the frontend shrinks under us breaks the queue, not the
 * process), and a stop ends the passes even if the driver never lets the ring empty. On a
 * dangling volume a write's used entry is published only after the ring's superblock that
 * covers its record is in the file, so a write the guest saw complete survives kill -9.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

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

static void async_teardown(struct vpv_queue *q);

/* Interrupt the driver through its call eventfd without ever blocking. The fd is
 * non-blocking (vpv_blk_queue_start): a full counter (a frontend that never reads it, or one
 * that filled it on purpose) gives EAGAIN, and then an interrupt is pending anyway. */
static int stopping(struct vpv_queue *q);

static int signal_call(struct vpv_queue *q, int fd)
{
    uint64_t one = 1;
    for (;;) {
        if (write(fd, &one, sizeof(one)) == sizeof(one))
            return 1;
        if (errno == EAGAIN)
            STAT_ADD(q, calls_saturated, 1);
        /* EINTR: the frontend cleared O_NONBLOCK on the description it shares with us and
         * the write blocked; the stop interrupted it (unstick_worker). */
        if (errno != EINTR || stopping(q))
            return 0;
    }
}

/* O_NONBLOCK lives in the open file description, which the frontend shares and can clear
 * again at any time (an eventfd cannot be reopened for a description of our own). So a
 * worker may still block on a frontend's fd; the stop then interrupts it with a signal whose
 * handler does nothing and is installed without SA_RESTART: the blocked call returns EINTR,
 * and the worker, seeing the stop, leaves. Nothing else in this process uses SIGURG (no
 * socket here asks for out-of-band data notifications). */
#define UNSTICK_SIGNAL SIGURG
#define UNSTICK_AFTER_MS 20
/* A worker that neither leaves nor is interrupted for this long is stuck in the kernel on
 * the volume's file (a stalled disk, a stopped FUSE server: uninterruptible waits). The stop
 * runs on the event loop, which serves every volume: it gives up on such a worker instead
 * of freezing them all (vpv_blk_queue_stop). */
#define STOP_GIVE_UP_MS 3000

static pthread_once_t unstick_once = PTHREAD_ONCE_INIT;
static uint64_t stuck_workers;   /* workers a stop gave up on, ever (for a debugger / core) */

static void unstick_handler(int sig)
{
    (void)sig;
}

static void unstick_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = unstick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;   /* no SA_RESTART */
    sigaction(UNSTICK_SIGNAL, &sa, NULL);
}

/* Consume a kick. RWF_NOWAIT makes this read non-blocking whatever the frontend did to the
 * shared O_NONBLOCK flag (eventfds support it since Linux 5.12; before, the flag and the
 * stop's interruption still cover it). Returns 1 if a kick was there. */
static int read_kick(int fd)
{
    uint64_t count;
    struct iovec iov = {.iov_base = &count, .iov_len = sizeof(count)};
    ssize_t r = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);
    if (r < 0 && errno == EOPNOTSUPP)
        r = read(fd, &count, sizeof(count));
    return r == sizeof(count);
}

/* Join a worker that was told to stop; interrupt it while it does not leave. 0 once it
 * left, -ETIMEDOUT when it is still there after STOP_GIVE_UP_MS. */
static int join_worker(struct vpv_queue *q)
{
    for (int waited = 0; waited < STOP_GIVE_UP_MS; waited += UNSTICK_AFTER_MS) {
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_nsec += UNSTICK_AFTER_MS * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
        int rc = pthread_timedjoin_np(q->thread, NULL, &deadline);
        if (rc == 0)
            return 0;
        if (rc != ETIMEDOUT) {
            pthread_join(q->thread, NULL);
            return 0;
        }
        pthread_kill(q->thread, UNSTICK_SIGNAL);
    }
    return -ETIMEDOUT;
}

/* The last reference (vpv_blk_free, or the last worker a stop gave up on) frees the device:
 * guest memory stays mapped while any worker may still complete a request into it. */
static void blk_unref(struct vpv_blk *blk)
{
    if (__atomic_sub_fetch(&blk->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    for (uint32_t i = 0; i < VPV_MAX_QUEUES; i++) {
        async_teardown(&blk->queues[i]);   /* a queue whose start failed after async_setup */
        free(blk->queues[i].bounce);
    }
    vpv_memory_unmap(&blk->mem);
    close(blk->broken_fd);
    free(blk);
}

/* The frontend's kick and call eventfds are read and written by the worker, which must
 * never block on them (a blocked worker blocks the stop that joins it, on the event loop).
 * O_NONBLOCK is a flag of the open file description, which the frontend shares: QEMU creates
 * its eventfds with EFD_NONBLOCK itself, so nothing changes for it. The control plane sets
 * it too (session.py); this keeps the C side safe on its own. */
static int set_nonblocking(int fd)
{
    if (fd < 0)
        return 0;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0))
        return -errno;
    return 0;
}

/* The stop is waiting for the worker. A driver that posts requests as fast as they complete
 * would otherwise keep it in its passes (which only end when the ring is empty) forever, and
 * the stop joins the worker on the event loop. Unfinished requests stay in the ring:
 * last_avail_idx, which the stop returns, says where to resume. */
static int stopping(struct vpv_queue *q)
{
    return __atomic_load_n(&q->stopping, __ATOMIC_RELAXED);
}

/* A queue stopped serving (corrupt ring, lost memory): tell the control plane. */
static void report_broken(struct vpv_queue *q)
{
    __atomic_store_n(&q->stats.broken, 1, __ATOMIC_RELAXED);
    uint64_t one = 1;
    if (write(q->blk->broken_fd, &one, sizeof(one)) < 0) {
        /* EAGAIN: saturated, it is readable already. */
    }
}

int vpv_blk_broken_fd(struct vpv_blk *blk)
{
    return blk->broken_fd;
}

struct vpv_blk *vpv_blk_new(struct vpv_volume *vol, uint32_t flags, const uint8_t *serial,
                            uint32_t source, int direct_fd, int *err)
{
    vpv_guard_install();
    pthread_once(&unstick_once, unstick_install);
    struct vpv_blk *blk = calloc(1, sizeof(*blk));
    if (!blk) {
        *err = -ENOMEM;
        return NULL;
    }
    blk->broken_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (blk->broken_fd < 0) {
        *err = -errno;
        free(blk);
        return NULL;
    }
    blk->vol = vol;
    blk->refs = 1;
    blk->fd = vol->fd;
    blk->direct_fd = direct_fd;
    blk->async_fd = direct_fd >= 0 ? direct_fd : vol->fd;
    blk->data_offset = vol->cfg.data_offset;
    blk->capacity = vol->cfg.capacity;
    blk->flags = flags;
    blk->source = source;
    memcpy(blk->serial, serial, VPV_SERIAL_BYTES);
    for (uint32_t i = 0; i < VPV_MAX_QUEUES; i++) {
        blk->queues[i].blk = blk;
        blk->queues[i].index = i;
        blk->queues[i].kick_fd = -1;
        blk->queues[i].call_fd = -1;
        blk->queues[i].stop_fd = -1;
        blk->queues[i].uring_efd = -1;
    }
    *err = 0;
    return blk;
}

void vpv_blk_free(struct vpv_blk *blk)
{
    if (!blk)
        return;
    for (uint32_t i = 0; i < VPV_MAX_QUEUES; i++)
        vpv_blk_queue_stop(blk, i);
    blk_unref(blk);
}

int vpv_blk_set_memory(struct vpv_blk *blk, const struct vpv_mem_region_desc *regions,
                       uint32_t count)
{
    for (uint32_t i = 0; i < VPV_MAX_QUEUES; i++)
        if (blk->queues[i].started)
            return -EBUSY;
    return vpv_memory_map(&blk->mem, regions, count);
}

/* -- iovec helpers ------------------------------------------------------------------------ */

static size_t iov_copy_out(const struct iovec *iov, uint32_t n, size_t skip, void *dst,
                           size_t len)
{
    size_t done = 0;
    for (uint32_t i = 0; i < n && done < len; i++) {
        size_t l = iov[i].iov_len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        size_t chunk = l - skip;
        if (chunk > len - done)
            chunk = len - done;
        memcpy((uint8_t *)dst + done, (uint8_t *)iov[i].iov_base + skip, chunk);
        done += chunk;
        skip = 0;
    }
    return done;
}

static size_t iov_copy_in(const struct iovec *iov, uint32_t n, const void *src, size_t len)
{
    size_t done = 0;
    for (uint32_t i = 0; i < n && done < len; i++) {
        size_t chunk = iov[i].iov_len;
        if (chunk > len - done)
            chunk = len - done;
        memcpy(iov[i].iov_base, (const uint8_t *)src + done, chunk);
        done += chunk;
    }
    return done;
}

/* Drop the first `skip` bytes of an iovec array in place; returns the new start. */
static struct iovec *iov_skip(struct iovec *iov, uint32_t *n, size_t skip)
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

/* Full-length positional vector I/O: retries short transfers and EINTR. */
static int rw_full(int fd, struct iovec *iov, uint32_t n, off_t off, size_t total, int write)
{
    while (total > 0) {
        ssize_t r = write ? pwritev(fd, iov, (int)n, off) : preadv(fd, iov, (int)n, off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0) {
            /* Past the end of a sparse file: the rest reads as zeros. */
            if (write)
                return -EIO;
            for (uint32_t i = 0; i < n; i++)
                memset(iov[i].iov_base, 0, iov[i].iov_len);
            return 0;
        }
        total -= (size_t)r;
        off += r;
        iov = iov_skip(iov, &n, (size_t)r);
    }
    return 0;
}

/* Data region I/O in the calling thread: through the O_DIRECT fd when there is one, and
 * through the page cache when the device refuses the buffers' alignment. */
static int data_rw(struct vpv_queue *q, struct iovec *iov, uint32_t n, off_t off, size_t len, int write)
{
    struct vpv_blk *blk = q->blk;
    if (blk->direct_fd >= 0) {
        int rc = rw_full(blk->direct_fd, iov, n, off, len, write);
        if (rc != -EINVAL)
            return rc;
        STAT_ADD(q, direct_fallbacks, 1);
    }
    return rw_full(blk->fd, iov, n, off, len, write);
}

/* Is [sector, sector + bytes) inside the data region? */
static int in_range(const struct vpv_blk *blk, uint64_t sector, uint64_t bytes)
{
    uint64_t max_sector = blk->capacity / VPV_SECTOR_SIZE;
    return sector <= max_sector && bytes <= (max_sector - sector) * VPV_SECTOR_SIZE;
}

/* Copy and check the segments of a DISCARD / WRITE_ZEROES request. Returns OK and fills
 * segs / *count / *bytes, or the status to fail the request with. */
static uint8_t parse_segments(const struct vpv_blk *blk, struct iovec *iov, uint32_t n, size_t len,
                              uint32_t type, struct blk_discard_segment *segs, uint32_t *count,
                              uint64_t *bytes_total)
{
    if (len == 0 || len % sizeof(segs[0]) || len / sizeof(segs[0]) > VPV_MAX_DISCARD_SEGMENTS)
        return VIRTIO_BLK_S_IOERR;
    *count = (uint32_t)(len / sizeof(segs[0]));
    *bytes_total = 0;
    iov_copy_out(iov, n, 0, segs, len);
    for (uint32_t i = 0; i < *count; i++) {
        uint32_t allowed = type == VIRTIO_BLK_T_WRITE_ZEROES ? VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                                                             : 0;
        if (segs[i].flags & ~allowed)
            return VIRTIO_BLK_S_UNSUPP;
        uint64_t bytes = (uint64_t)segs[i].num_sectors * VPV_SECTOR_SIZE;
        if (segs[i].num_sectors > VPV_MAX_DISCARD_SECTORS || !in_range(blk, segs[i].sector, bytes))
            return VIRTIO_BLK_S_IOERR;
        *bytes_total += bytes;
    }
    return VIRTIO_BLK_S_OK;
}

static uint8_t do_discard(struct vpv_queue *q, struct iovec *iov, uint32_t n, size_t len,
                          uint32_t type)
{
    struct vpv_blk *blk = q->blk;
    struct blk_discard_segment segs[VPV_MAX_DISCARD_SEGMENTS];
    uint32_t count;
    uint64_t total;
    uint8_t st = parse_segments(blk, iov, n, len, type, segs, &count, &total);
    if (st != VIRTIO_BLK_S_OK)
        return st;
    for (uint32_t i = 0; i < count; i++) {
        off_t off = (off_t)(blk->data_offset + segs[i].sector * VPV_SECTOR_SIZE);
        off_t bytes = (off_t)segs[i].num_sectors * VPV_SECTOR_SIZE;
        if (bytes == 0)
            continue;
        int mode = FALLOC_FL_KEEP_SIZE;
        if (type == VIRTIO_BLK_T_DISCARD ||
            (segs[i].flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
            mode |= FALLOC_FL_PUNCH_HOLE;   /* reads as zeros and frees the blocks */
        else
            mode |= FALLOC_FL_ZERO_RANGE;
        if (fallocate(blk->fd, mode, off, bytes) == 0)
            continue;
        if (type == VIRTIO_BLK_T_DISCARD)
            return VIRTIO_BLK_S_IOERR;
        /* File systems without ZERO_RANGE: punching a hole zeroes as well. */
        if (fallocate(blk->fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, off, bytes) != 0)
            return VIRTIO_BLK_S_IOERR;
    }
    return VIRTIO_BLK_S_OK;
}

static void post_event(struct vpv_queue *q, const struct blk_req_header *hdr, uint64_t length,
                       uint16_t outcome, uint64_t seq)
{
    struct vpv_dangling_event ev = {
        .time_ns = vpv_now_ns(),
        .sector = hdr->sector,
        .seq = seq,
        .length = length > UINT32_MAX ? UINT32_MAX : (uint32_t)length,
        .source = q->blk->source,
        .request_type = (uint16_t)hdr->type,
        .queue = (uint16_t)q->index,
        .outcome = outcome,
    };
    vpv_volume_post_event(q->blk->vol, &ev);
}

static uint8_t quarantine(struct vpv_queue *q, const struct blk_req_header *hdr, uint16_t type,
                          uint64_t sector, uint64_t length, struct iovec *iov, uint32_t n,
                          size_t payload_len)
{
    uint64_t seq = 0;
    /* Copy the payload out of guest memory here, before vpv_volume_ring_append takes the
     * ring's mutex: memory that vanishes under us faults in this copy (the SIGBUS guard
     * jumps out of it), never while a lock other queues need is held. A payload larger than
     * the whole ring is refused by the append before it reads a byte. */
    struct iovec copy;
    if (payload_len <= q->blk->vol->super.area_size) {
        if (q->bounce_size < payload_len) {
            uint8_t *b = realloc(q->bounce, payload_len);
            if (!b) {
                STAT_ADD(q, quarantine_refused, 1);
                post_event(q, hdr, length, VPV_EVENT_RING_ERROR, 0);
                return VIRTIO_BLK_S_IOERR;
            }
            q->bounce = b;
            q->bounce_size = payload_len;
        }
        copy.iov_base = q->bounce;
        copy.iov_len = iov_copy_out(iov, n, 0, q->bounce, payload_len);
        iov = &copy;
        n = 1;
    }
    int err = vpv_volume_ring_append(q->blk->vol, type, (uint16_t)q->index, q->blk->source, sector,
                                     length > UINT32_MAX ? UINT32_MAX : (uint32_t)length, iov, n,
                                     payload_len, &seq);
    if (err == 0) {
        /* Acknowledged only once the superblock covering the record is in the file
         * (publish_deferred, at the end of the round). */
        q->quarantined = 1;
        STAT_ADD(q, quarantined, 1);
        post_event(q, hdr, length, VPV_EVENT_QUARANTINED, seq);
        return VIRTIO_BLK_S_OK;
    }
    STAT_ADD(q, quarantine_refused, 1);
    post_event(q, hdr, length,
               err == -ENOSPC || err == -E2BIG ? VPV_EVENT_RING_FULL : VPV_EVENT_RING_ERROR, 0);
    return VIRTIO_BLK_S_IOERR;
}

/* fdatasync reports a writeback error to an open file once: the pages whose writeback
 * failed are then clean (or gone) in the page cache, and the next fdatasync answers 0
 * although their data never reached the disk. So the first failure is remembered for the
 * volume and every later FLUSH, on any connection, fails too (as QEMU does after a failed
 * flush) until the volume is opened again: a guest never hears OK for writes it lost. */
static uint8_t flush_file(struct vpv_blk *blk)
{
    int *failed = &blk->vol->writeback_failed;
    if (__atomic_load_n(failed, __ATOMIC_ACQUIRE))
        return VIRTIO_BLK_S_IOERR;
    if (fdatasync(blk->fd) == 0)
        return VIRTIO_BLK_S_OK;
    __atomic_store_n(failed, 1, __ATOMIC_RELEASE);
    return VIRTIO_BLK_S_IOERR;
}

/* A request on a dangling volume: nothing touches the data region. Writes of any kind
 * become ring records; reads follow the volume's read policy; all are reported. */
static uint8_t execute_dangling(struct vpv_queue *q, const struct blk_req_header *hdr,
                                struct iovec *rd, uint32_t n_rd, size_t rd_len,
                                struct iovec *wr, uint32_t n_wr, size_t wr_len,
                                uint32_t *data_written)
{
    struct vpv_blk *blk = q->blk;
    switch (hdr->type) {
    case VIRTIO_BLK_T_IN: {
        STAT_ADD(q, reads, 1);
        if (wr_len % VPV_SECTOR_SIZE || !in_range(blk, hdr->sector, wr_len))
            return VIRTIO_BLK_S_IOERR;
        uint32_t policy = blk->vol->cfg.read_policy;
        if (policy == VPV_READ_ZEROS) {
            for (uint32_t i = 0; i < n_wr; i++)
                memset(wr[i].iov_base, 0, wr[i].iov_len);
            post_event(q, hdr, wr_len, VPV_EVENT_READ_ZEROS, 0);
        } else if (policy == VPV_READ_ALLOW) {
            off_t off = (off_t)(blk->data_offset + hdr->sector * VPV_SECTOR_SIZE);
            if (rw_full(blk->fd, wr, n_wr, off, wr_len, 0) != 0)
                return VIRTIO_BLK_S_IOERR;
            post_event(q, hdr, wr_len, VPV_EVENT_READ_ALLOWED, 0);
        } else {
            STAT_ADD(q, dangling_denied, 1);
            post_event(q, hdr, wr_len, VPV_EVENT_READ_DENIED, 0);
            return VIRTIO_BLK_S_IOERR;
        }
        *data_written = (uint32_t)wr_len;
        STAT_ADD(q, bytes_read, wr_len);
        return VIRTIO_BLK_S_OK;
    }
    case VIRTIO_BLK_T_OUT: {
        STAT_ADD(q, writes, 1);
        if (rd_len % VPV_SECTOR_SIZE || !in_range(blk, hdr->sector, rd_len))
            return VIRTIO_BLK_S_IOERR;
        return quarantine(q, hdr, VPV_RECORD_WRITE, hdr->sector, rd_len, rd, n_rd, rd_len);
    }
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES: {
        if (hdr->type == VIRTIO_BLK_T_DISCARD)
            STAT_ADD(q, discards, 1);
        else
            STAT_ADD(q, write_zeroes, 1);
        struct blk_discard_segment segs[VPV_MAX_DISCARD_SEGMENTS];
        uint32_t count;
        uint64_t total;
        uint8_t st = parse_segments(blk, rd, n_rd, rd_len, hdr->type, segs, &count, &total);
        if (st != VIRTIO_BLK_S_OK)
            return st;
        /* The payload is the segment list itself: replay needs exactly that. */
        struct iovec seg_iov = {.iov_base = segs, .iov_len = rd_len};
        uint16_t type = hdr->type == VIRTIO_BLK_T_DISCARD ? VPV_RECORD_DISCARD
                                                          : VPV_RECORD_WRITE_ZEROES;
        return quarantine(q, hdr, type, segs[0].sector, total, &seg_iov, 1, rd_len);
    }
    case VIRTIO_BLK_T_FLUSH:
        /* Makes the quarantined records durable; the data region is untouched anyway. */
        STAT_ADD(q, flushes, 1);
        if (vpv_volume_ring_sync(blk->vol) != 0)
            return VIRTIO_BLK_S_IOERR;
        return flush_file(blk);
    case VIRTIO_BLK_T_GET_ID: {
        STAT_ADD(q, get_ids, 1);
        size_t len = wr_len < VPV_SERIAL_BYTES ? wr_len : VPV_SERIAL_BYTES;
        *data_written = (uint32_t)iov_copy_in(wr, n_wr, blk->serial, len);
        return VIRTIO_BLK_S_OK;
    }
    default:
        STAT_ADD(q, unsupported, 1);
        return VIRTIO_BLK_S_UNSUPP;
    }
}

static void async_drain(struct vpv_queue *q);

/* Hand a read or write to the io_uring when this queue has one and a free slot; it is
 * completed by async_reap. Returns the slot, or NULL when the request must be done
 * synchronously. Called inside a round (flip lock held, state checked). */
static struct async_slot *async_prepare(struct vpv_queue *q, struct iovec *iov, uint32_t n, off_t off,
                                        size_t len, int write)
{
    if (!q->slots || q->free_slot == VPV_ASYNC_SLOTS || n > VPV_SLOT_IOV)
        return NULL;
    /* A buffered write is mostly a copy into the page cache: done inline it costs less than
     * the io_uring, which hands every write that might block to a kernel worker thread
     * (loadgen, 4k randwrite through the page cache: QD1 11.4k inline vs 9.2k on the
     * io_uring, QD32 about equal, half the CPU per write). */
    if (write && q->blk->direct_fd < 0)
        return NULL;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&q->uring);
    if (!sqe)
        return NULL;
    struct async_slot *slot = &q->slots[q->free_slot];
    q->free_slot = slot->next_free;
    q->inflight++;
    q->unsubmitted++;
    if (write)
        __atomic_fetch_add(&q->blk->vol->inflight_writes, 1, __ATOMIC_SEQ_CST);
    memcpy(slot->iov, iov, n * sizeof(*iov));
    slot->niov = n;
    slot->off = (uint64_t)off;
    slot->len = len;
    slot->write = write;
    if (write)
        io_uring_prep_writev(sqe, q->blk->async_fd, slot->iov, n, off);
    else
        io_uring_prep_readv(sqe, q->blk->async_fd, slot->iov, n, off);
    io_uring_sqe_set_data(sqe, slot);
    STAT_ADD(q, async_ios, 1);
    return slot;
}

/* Execute one well-formed chain; returns the status byte and sets *data_written, or
 * STATUS_PENDING when the request is in flight on the io_uring (*slot_out: the caller
 * fills in where its completion goes). */
static uint8_t execute(struct vpv_queue *q, struct vpv_chain *c, uint32_t *data_written,
                       struct async_slot **slot_out)
{
    struct vpv_blk *blk = q->blk;
    struct blk_req_header hdr;
    *data_written = 0;
    if (iov_copy_out(c->iov, c->n_in, 0, &hdr, sizeof(hdr)) != sizeof(hdr)) {
        STAT_ADD(q, bad_requests, 1);
        return VIRTIO_BLK_S_IOERR;
    }
    /* Readable payload after the header, writable payload before the status byte. */
    uint32_t n_rd = c->n_in;
    struct iovec *rd = iov_skip(c->iov, &n_rd, sizeof(hdr));
    size_t rd_len = c->in_bytes - sizeof(hdr);
    uint32_t n_wr = c->n_out;
    struct iovec *wr = c->iov + c->n_in;
    size_t wr_len = c->out_bytes - 1;
    wr[n_wr - 1].iov_len -= 1;
    if (wr[n_wr - 1].iov_len == 0)
        n_wr--;

    int writes = hdr.type == VIRTIO_BLK_T_OUT || hdr.type == VIRTIO_BLK_T_DISCARD ||
                 hdr.type == VIRTIO_BLK_T_WRITE_ZEROES;
    if (writes && (blk->flags & VPV_BLK_READ_ONLY))
        return VIRTIO_BLK_S_IOERR;
    /* Read under the flip lock (held by the caller): a flip waits for this request. */
    uint32_t state = __atomic_load_n(blk->vol->state, __ATOMIC_ACQUIRE);
    if (state == VPV_STATE_DANGLING)
        return execute_dangling(q, &hdr, rd, n_rd, rd_len, wr, n_wr, wr_len, data_written);
    if (state != VPV_STATE_ATTACHED && hdr.type != VIRTIO_BLK_T_GET_ID)
        return VIRTIO_BLK_S_IOERR;   /* unknown state word: serve no data */

    switch (hdr.type) {
    case VIRTIO_BLK_T_IN: {
        STAT_ADD(q, reads, 1);
        if (wr_len % VPV_SECTOR_SIZE || !in_range(blk, hdr.sector, wr_len))
            return VIRTIO_BLK_S_IOERR;
        off_t off = (off_t)(blk->data_offset + hdr.sector * VPV_SECTOR_SIZE);
        if ((*slot_out = async_prepare(q, wr, n_wr, off, wr_len, 0)) != NULL)
            return STATUS_PENDING;
        if (data_rw(q, wr, n_wr, off, wr_len, 0) != 0)
            return VIRTIO_BLK_S_IOERR;
        *data_written = (uint32_t)wr_len;
        STAT_ADD(q, bytes_read, wr_len);
        return VIRTIO_BLK_S_OK;
    }
    case VIRTIO_BLK_T_OUT: {
        STAT_ADD(q, writes, 1);
        if (rd_len % VPV_SECTOR_SIZE || !in_range(blk, hdr.sector, rd_len))
            return VIRTIO_BLK_S_IOERR;
        off_t off = (off_t)(blk->data_offset + hdr.sector * VPV_SECTOR_SIZE);
        if ((*slot_out = async_prepare(q, rd, n_rd, off, rd_len, 1)) != NULL)
            return STATUS_PENDING;
        if (data_rw(q, rd, n_rd, off, rd_len, 1) != 0)
            return VIRTIO_BLK_S_IOERR;
        STAT_ADD(q, bytes_written, rd_len);
        return VIRTIO_BLK_S_OK;
    }
    case VIRTIO_BLK_T_FLUSH:
        STAT_ADD(q, flushes, 1);
        async_drain(q);   /* let it cover every write this queue has in flight too */
        return flush_file(blk);
    case VIRTIO_BLK_T_GET_ID: {
        STAT_ADD(q, get_ids, 1);
        size_t len = wr_len < VPV_SERIAL_BYTES ? wr_len : VPV_SERIAL_BYTES;
        *data_written = (uint32_t)iov_copy_in(wr, n_wr, blk->serial, len);
        return VIRTIO_BLK_S_OK;
    }
    case VIRTIO_BLK_T_DISCARD:
        STAT_ADD(q, discards, 1);
        async_drain(q);   /* never punch under a write still in flight */
        return do_discard(q, rd, n_rd, rd_len, hdr.type);
    case VIRTIO_BLK_T_WRITE_ZEROES:
        STAT_ADD(q, write_zeroes, 1);
        async_drain(q);
        return do_discard(q, rd, n_rd, rd_len, hdr.type);
    default:
        STAT_ADD(q, unsupported, 1);
        return VIRTIO_BLK_S_UNSUPP;
    }
}

/* Where a finished request's status goes, and its used entry. */
static void complete(struct vpv_queue *q, uint16_t head, uint8_t *status_ptr, uint8_t status,
                     uint32_t written)
{
    if (status != VIRTIO_BLK_S_OK)
        written = 0;
    if (status == VIRTIO_BLK_S_IOERR)
        STAT_ADD(q, io_errors, 1);
    /* A stop that gave up on this worker ended the connection: its ring is no one's now. */
    if (__atomic_load_n(&q->abandoned, __ATOMIC_ACQUIRE) == 1)
        return;
    *status_ptr = status;
    vpv_vring_push(&q->vr, head, written + 1);
}

/* One io_uring completion: short transfers are finished, and a request O_DIRECT refused
 * for its alignment is done again through the page cache, both synchronously. The slot is
 * released before the status byte and used entry go to guest memory, so a fault there (the
 * memory vanished) leaves the slot bookkeeping and the volume's in-flight count right. */
static void async_release(struct vpv_queue *q, struct async_slot *slot);

static void async_complete(struct vpv_queue *q, struct async_slot *slot, int res)
{
    uint8_t status = VIRTIO_BLK_S_OK;
    if (res == -EINVAL) {
        STAT_ADD(q, direct_fallbacks, 1);
        res = rw_full(q->blk->fd, slot->iov, slot->niov, (off_t)slot->off, slot->len, slot->write);
        if (res == 0)
            res = (int)slot->len;
    }
    if (res < 0) {
        status = VIRTIO_BLK_S_IOERR;
    } else if ((uint64_t)res < slot->len) {
        /* Short: the rest through the page cache (it may no longer be aligned for O_DIRECT). */
        uint32_t n = slot->niov;
        struct iovec *rest = iov_skip(slot->iov, &n, (size_t)res);
        if (rw_full(q->blk->fd, rest, n, (off_t)(slot->off + (uint64_t)res), slot->len - (uint64_t)res,
                    slot->write) != 0)
            status = VIRTIO_BLK_S_IOERR;
    }
    if (status == VIRTIO_BLK_S_OK) {
        if (slot->write)
            STAT_ADD(q, bytes_written, slot->len);
        else
            STAT_ADD(q, bytes_read, slot->len);
    }
    uint16_t head = slot->head;
    uint8_t *status_ptr = slot->status_ptr;
    uint32_t written = slot->write ? 0 : (uint32_t)slot->len;
    async_release(q, slot);
    complete(q, head, status_ptr, status, written);
}

static void async_release(struct vpv_queue *q, struct async_slot *slot)
{
    if (slot->write)
        __atomic_fetch_sub(&q->blk->vol->inflight_writes, 1, __ATOMIC_SEQ_CST);
    slot->status_ptr = NULL;
    slot->next_free = q->free_slot;
    q->free_slot = (uint32_t)(slot - q->slots);
    q->inflight--;
}

static void async_submit(struct vpv_queue *q)
{
    if (q->unsubmitted == 0)
        return;
    int rc;
    do {
        rc = io_uring_submit(&q->uring);
    } while (rc == -EINTR);
    q->unsubmitted = 0;
}

/* Complete what the io_uring finished; with wait, block until at least `wait` more have.
 * Returns how many completed. */
static uint32_t async_reap(struct vpv_queue *q, uint32_t wait)
{
    uint32_t done = 0;
    while (q->inflight > 0) {
        struct io_uring_cqe *cqe;
        int rc = done < wait ? io_uring_wait_cqe(&q->uring, &cqe) : io_uring_peek_cqe(&q->uring, &cqe);
        if (rc == -EINTR)
            continue;
        if (rc == -EAGAIN)
            break;
        if (rc < 0) {
            /* The io_uring itself failed. It has never been seen to; without this the
             * driver would wait forever for what is in flight. */
            for (uint32_t i = 0; i < VPV_ASYNC_SLOTS; i++) {
                struct async_slot *slot = &q->slots[i];
                if (slot->status_ptr) {
                    uint16_t head = slot->head;
                    uint8_t *status_ptr = slot->status_ptr;
                    async_release(q, slot);
                    complete(q, head, status_ptr, VIRTIO_BLK_S_IOERR, 0);
                    done++;
                }
            }
            break;
        }
        struct async_slot *slot = io_uring_cqe_get_data(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&q->uring, cqe);
        async_complete(q, slot, res);   /* releases the slot */
        done++;
    }
    return done;
}

/* A broken queue's requests still in flight: wait for each (the kernel finishes I/O into
 * memory that vanished with EFAULT, it does not hang) and free its slot without touching
 * guest memory; nothing is published on a broken ring. */
static void async_abandon(struct vpv_queue *q)
{
    if (!q->slots)
        return;
    async_submit(q);
    while (q->inflight > 0) {
        struct io_uring_cqe *cqe;
        int rc = io_uring_wait_cqe(&q->uring, &cqe);
        if (rc == -EINTR)
            continue;
        if (rc < 0) {
            for (uint32_t i = 0; i < VPV_ASYNC_SLOTS; i++)
                if (q->slots[i].status_ptr)
                    async_release(q, &q->slots[i]);
            break;
        }
        struct async_slot *slot = io_uring_cqe_get_data(cqe);
        io_uring_cqe_seen(&q->uring, cqe);
        async_release(q, slot);
    }
}

/* Wait for everything this queue has in flight. */
static void async_drain(struct vpv_queue *q)
{
    if (!q->slots)
        return;
    if (__atomic_load_n(&q->stats.broken, __ATOMIC_RELAXED)) {
        async_abandon(q);
        return;
    }
    async_submit(q);
    async_reap(q, q->inflight);
}

/* Publish the quarantined requests of this round: first the ring's superblock, which makes
 * their records part of the ring in the file, then their used entries. A used entry
 * published before would let a crash (kill -9: the page cache survives, our cached
 * superblock does not) lose a write the guest saw complete. One superblock write per round,
 * not per record. */
static void publish_deferred(struct vpv_queue *q)
{
    if (q->ndeferred == 0)
        return;
    int err = vpv_volume_ring_sync(q->blk->vol);
    uint32_t n = q->ndeferred;
    q->ndeferred = 0;   /* before touching guest memory: a fault must not publish them again */
    for (uint32_t i = 0; i < n; i++) {
        struct deferred_push *d = &q->deferred[i];
        complete(q, d->head, d->status_ptr, err ? VIRTIO_BLK_S_IOERR : d->status, 0);
    }
}

/* Guest memory vanished under the worker (SIGBUS caught by the guard, which jumped here out
 * of whatever touched it). Release what the worker holds, abandon its I/O, mark the queue
 * broken and tell the control plane; the worker then waits for its stop. Quarantined records
 * stay in the ring (they were appended); their completions are lost with the memory. */
static void queue_fault(struct vpv_queue *q)
{
    if (q->in_round) {
        q->in_round = 0;
        vpv_volume_end_request(q->blk->vol);
    }
    q->ndeferred = 0;
    STAT_ADD(q, guest_faults, 1);
    report_broken(q);   /* async_drain abandons from now on */
    async_abandon(q);
}

/* Drain the ring once, in rounds. Returns requests taken (completed or in flight) or -EIO
 * when the ring is corrupt. Stops early, leaving requests in the ring, when every io_uring
 * slot is busy: a completion wakes the worker for the rest. */
static int process_ring(struct vpv_queue *q)
{
    struct vpv_chain *c = &q->chain;
    int taken = 0;
    int more = 1;
    while (more && !stopping(q)) {
        /* A round under the flip lock: a flip lands between two rounds. */
        vpv_volume_begin_request(q->blk->vol);
        q->in_round = 1;
        for (uint32_t round = 0; round < VPV_ASYNC_SLOTS; round++) {
            if (q->slots && q->free_slot == VPV_ASYNC_SLOTS) {
                more = 0;   /* all slots busy: the rest waits for completions */
                break;
            }
            enum vpv_pop r = vpv_vring_pop(&q->vr, &q->blk->mem, c);
            if (r == VPV_POP_EMPTY) {
                more = 0;
                break;
            }
            if (r == VPV_POP_BROKEN) {
                publish_deferred(q);
                async_drain(q);
                q->in_round = 0;
                vpv_volume_end_request(q->blk->vol);
                report_broken(q);
                return -EIO;
            }
            STAT_ADD(q, requests, 1);
            taken++;
            if (r == VPV_POP_BAD_CHAIN || !c->status_ok) {
                /* No trustworthy status byte: complete it empty so the driver can reclaim it. */
                STAT_ADD(q, bad_requests, 1);
                vpv_vring_push(&q->vr, c->head, 0);
                continue;
            }
            /* The status byte is the last byte of the last writable buffer; find it before
             * execute() trims that buffer to the data part. */
            struct iovec *last = &c->iov[c->n_in + c->n_out - 1];
            uint8_t *status_ptr = (uint8_t *)last->iov_base + last->iov_len - 1;
            uint8_t status;
            uint32_t written = 0;
            struct async_slot *slot = NULL;
            if (c->bad) {
                STAT_ADD(q, bad_requests, 1);
                status = VIRTIO_BLK_S_IOERR;
            } else {
                q->quarantined = 0;
                status = execute(q, c, &written, &slot);
                if (q->quarantined) {
                    q->deferred[q->ndeferred++] =
                        (struct deferred_push){.head = c->head, .status = status, .status_ptr = status_ptr};
                    continue;
                }
            }
            if (status == STATUS_PENDING) {
                slot->head = c->head;
                slot->status_ptr = status_ptr;
                continue;
            }
            complete(q, c->head, status_ptr, status, written);
        }
        /* Submitted inside the round: a write is counted in flight before a flip can run. */
        async_submit(q);
        publish_deferred(q);
        q->in_round = 0;
        vpv_volume_end_request(q->blk->vol);
    }
    __atomic_store_n(&q->stats.last_avail_idx, q->vr.last_avail_idx, __ATOMIC_RELAXED);
    if (taken && q->blk->vol->super_dirty)
        vpv_volume_ring_sync(q->blk->vol);   /* once per batch, not per quarantined record */
    return taken;
}

static void notify(struct vpv_queue *q)
{
    /* Only new used entries are worth an interrupt (requests taken but still in flight on
     * the io_uring have none yet). */
    if (q->vr.used_idx == q->notify_checked_used)
        return;
    q->notify_checked_used = q->vr.used_idx;
    if (q->call_fd >= 0 && vpv_vring_should_notify(&q->vr) && signal_call(q, q->call_fd))
        STAT_ADD(q, notifications, 1);
}

/* One pass: take what is available, complete what finished, notify. Returns requests
 * taken and completed, or -EIO. */
static int queue_pass(struct vpv_queue *q)
{
    int total = 0;
    do {
        vpv_vring_disable_kicks(&q->vr);
        int n = process_ring(q);
        if (n < 0)
            return n;
        uint32_t reaped = q->slots ? async_reap(q, 0) : 0;
        total += n;
        if (n > 0 || reaped > 0)
            notify(q);
        if (q->slots && q->free_slot == VPV_ASYNC_SLOTS)
            break;   /* kicks stay off: the next completion brings the worker back */
        if (stopping(q))
            break;
    } while (vpv_vring_enable_kicks(&q->vr));
    return total;
}

int vpv_blk_queue_process(struct vpv_blk *blk, uint32_t index)
{
    if (index >= VPV_MAX_QUEUES || !blk->queues[index].started)
        return -EINVAL;
    struct vpv_queue *q = &blk->queues[index];
    if (q->stats.broken)
        return -EIO;
    /* In the caller's thread: guarded like a worker's passes. */
    sigjmp_buf env;
    sigjmp_buf *prev = vpv_guard_arm(NULL);
    if (sigsetjmp(env, 0)) {
        vpv_guard_restore(prev);
        queue_fault(q);
        return -EFAULT;
    }
    vpv_guard_arm(&env);
    int total = 0;
    int n;
    /* Called without a worker (tests, no kick fd): finish everything before returning. */
    do {
        n = queue_pass(q);
        if (n < 0)
            break;
        total += n;
        if (q->inflight > 0) {
            async_drain(q);
            notify(q);
        }
    } while (n > 0 && vpv_vring_avail_pending(&q->vr));
    vpv_guard_restore(prev);
    return n < 0 ? n : total;
}

/* How long a queue may sit idle before the watchdog looks at it. */
#define WATCHDOG_MS 1000

/* An idle queue whose driver still waits for completions we have published: interrupt it
 * again. This should never fire; if an interrupt is ever lost (we have seen guests stall
 * under heavy host contention), it turns a hung request into a one-second stall, and the
 * counter makes it visible. */
static void watchdog(struct vpv_queue *q)
{
    struct vpv_vring *vr = &q->vr;
    if (q->call_fd < 0 || !vr->event_idx || q->stats.broken)
        return;
    uint16_t used_event = __atomic_load_n(&vr->avail->ring[vr->num], __ATOMIC_RELAXED);
    uint16_t used_idx = __atomic_load_n(&vr->used->idx, __ATOMIC_RELAXED);
    uint16_t unseen = (uint16_t)(used_idx - used_event);
    /* used_event is where the driver stopped reading; more than that is published. */
    if (unseen == 0 || unseen > vr->num)
        return;
    if (signal_call(q, q->call_fd))
        STAT_ADD(q, watchdog_notifications, 1);
}

/* Kick coalescing. Under emulation a doorbell write (kick) and an interrupt cost the guest
 * far more than the request costs us, and we finish each request so fast that nearly every
 * one came with its own kick and interrupt. Waiting a little after a kick lets the driver
 * post more requests without kicking (the kick already sent covers them) and lets one
 * interrupt complete them all: 4k randread QD32 in a TCG guest went from 9.6k to 18.7k IOPS.
 * The wait is a sleep, not a spin, so it takes no CPU from the guest. */
#define COALESCE_NS 50000L
#define COALESCE_PROBE_EVERY 16

static void coalesce_kicks(struct vpv_queue *q)
{
    if (!q->coalescing && ++q->wakes % COALESCE_PROBE_EVERY != 0)
        return;
    struct timespec ts = {0, COALESCE_NS};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
    STAT_ADD(q, coalesced_wakes, 1);
}

/* Adaptive polling, as QEMU's event loop does (poll-max-ns, 32 us by default). Falling
 * asleep in poll() and being woken by the next kick costs tens of microseconds here, more
 * than a request; a driver that answers a completion with a new request within a few
 * microseconds (QD1, a fast frontend) pays that on every request. So after a pass the
 * worker watches the avail ring for up to poll_ns before sleeping. The window adapts:
 * it doubles (from POLL_START_NS) while sleeps end within POLL_MAX_NS, meaning the driver
 * comes back soon, and closes when a sleep lasts longer: a slow driver (a TCG guest) gets
 * no spinning that would take a core from it. */
#define POLL_START_NS 4000ull
#define POLL_MAX_NS 32000ull

static uint64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Spin for up to window_ns until the driver made requests available or the io_uring
 * completed some; 1 if either happened. */
static int poll_work(struct vpv_queue *q, uint64_t window_ns)
{
    uint64_t deadline = monotonic_ns() + window_ns;
    do {
        for (int i = 0; i < 64; i++) {
            if (vpv_vring_avail_pending(&q->vr) || (q->slots && io_uring_cq_ready(&q->uring)))
                return 1;
            __builtin_ia32_pause();
        }
    } while (monotonic_ns() < deadline);
    return 0;
}

/* The worker's loop, until the stop. A broken queue only waits for its stop. */
static void worker_loop(struct vpv_queue *q)
{
    int broken = __atomic_load_n(&q->stats.broken, __ATOMIC_RELAXED);
    struct pollfd fds[3] = {
        {.fd = broken ? -1 : q->kick_fd, .events = POLLIN},
        {.fd = q->stop_fd, .events = POLLIN},
        {.fd = broken ? -1 : q->uring_efd, .events = POLLIN},   /* -1 (ignored) without an io_uring */
    };
    uint64_t poll_ns = 0;
    /* A kick may have been sent before we started polling: look once up front. */
    if (!broken && queue_pass(q) == -EIO)
        fds[0].fd = -1;
    for (;;) {
        if (stopping(q))
            break;
        if (poll_ns && fds[0].fd >= 0 && poll_work(q, poll_ns)) {
            STAT_ADD(q, polled_wakes, 1);
            if (queue_pass(q) == -EIO)
                fds[0].fd = -1;
            continue;
        }
        uint64_t slept_from = monotonic_ns();
        int ready = poll(fds, 3, WATCHDOG_MS);
        uint64_t slept = monotonic_ns() - slept_from;
        if (slept <= POLL_MAX_NS)
            poll_ns = poll_ns ? (poll_ns * 2 > POLL_MAX_NS ? POLL_MAX_NS : poll_ns * 2) : POLL_START_NS;
        else
            poll_ns = 0;
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (ready == 0) {
            if (fds[0].fd >= 0)
                watchdog(q);
            continue;
        }
        if (fds[1].revents)
            break;
        if (fds[2].revents & POLLIN) {
            uint64_t count;
            if (read(q->uring_efd, &count, sizeof(count)) < 0 && errno != EAGAIN)
                fds[2].fd = -1;
        }
        if (fds[0].revents & POLLIN) {
            if (read_kick(q->kick_fd))
                STAT_ADD(q, kicks, 1);
            coalesce_kicks(q);
        } else if (fds[0].revents) {
            fds[0].fd = -1;       /* kick fd hung up: nothing more will arrive */
        }
        if (fds[0].fd < 0 && !(fds[2].revents & POLLIN))
            continue;
        int n = queue_pass(q);
        if (n == -EIO)
            fds[0].fd = -1;   /* broken ring: stop serving, wait for the stop */
        /* Keep coalescing while wakes find several requests; a driver with one request in
         * flight (QD1) gets no delay, except on the occasional probe. */
        if (fds[0].revents & POLLIN)
            q->coalescing = n > 1;
    }
    /* Guest memory is unmapped after the stop: nothing may still be in flight into it. */
    async_drain(q);
}

static void *queue_worker(void *arg)
{
    struct vpv_queue *q = arg;
    /* Every pass over guest memory runs under the SIGBUS guard: a frontend that shrinks its
     * memory file breaks this queue, not the process. The whole loop is armed (a TLS store,
     * once); a fault lands here, then the loop runs again and only waits for the stop. */
    sigset_t unstick;
    sigemptyset(&unstick);
    sigaddset(&unstick, UNSTICK_SIGNAL);
    pthread_sigmask(SIG_UNBLOCK, &unstick, NULL);   /* whatever mask the creating thread had */
    sigjmp_buf env;
    if (sigsetjmp(env, 0))
        queue_fault(q);
    vpv_guard_arm(&env);
    worker_loop(q);
    vpv_guard_restore(NULL);
    if (__atomic_exchange_n(&q->abandoned, 2, __ATOMIC_ACQ_REL) == 1) {
        /* The stop gave up on us (detached): what it would have done after the join. */
        struct vpv_blk *blk = q->blk;
        async_teardown(q);
        close(q->stop_fd);
        q->stop_fd = -1;
        __atomic_sub_fetch(&blk->vol->abandoned_workers, 1, __ATOMIC_RELEASE);
        blk_unref(blk);
    }
    return NULL;
}

/* The queue's io_uring, its slots and its completion eventfd. Without an io_uring
 * (kernel.io_uring_disabled, old kernels) the data I/O is synchronous: slower, still
 * correct. */
static void async_setup(struct vpv_queue *q)
{
    q->slots = calloc(VPV_ASYNC_SLOTS, sizeof(*q->slots));
    if (!q->slots)
        return;
    for (uint32_t i = 0; i < VPV_ASYNC_SLOTS; i++)
        q->slots[i].next_free = i + 1;
    q->free_slot = 0;
    q->inflight = q->unsubmitted = 0;
    q->uring_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q->uring_efd >= 0 && io_uring_queue_init(VPV_ASYNC_SLOTS, &q->uring, 0) == 0) {
        if (io_uring_register_eventfd(&q->uring, q->uring_efd) == 0)
            return;
        io_uring_queue_exit(&q->uring);
    }
    if (q->uring_efd >= 0)
        close(q->uring_efd);
    q->uring_efd = -1;
    free(q->slots);
    q->slots = NULL;
}

static void async_teardown(struct vpv_queue *q)
{
    if (!q->slots)
        return;
    async_drain(q);
    io_uring_queue_exit(&q->uring);
    close(q->uring_efd);
    q->uring_efd = -1;
    free(q->slots);
    q->slots = NULL;
}

int vpv_blk_queue_start(struct vpv_blk *blk, uint32_t index, const struct vpv_vring_config *cfg)
{
    if (index >= VPV_MAX_QUEUES)
        return -EINVAL;
    struct vpv_queue *q = &blk->queues[index];
    /* A worker the stop gave up on still owns the ring and io_uring of this queue. */
    if (q->started || __atomic_load_n(&q->abandoned, __ATOMIC_ACQUIRE) == 1)
        return -EBUSY;
    q->abandoned = 0;
    int err = vpv_vring_init(&q->vr, &blk->mem, cfg);
    if (err)
        return err;
    memset(&q->stats, 0, sizeof(q->stats));
    q->coalescing = 0;
    q->wakes = 0;
    if (!q->slots && !(blk->flags & VPV_BLK_SYNC_IO))
        async_setup(q);
    q->stats.last_avail_idx = q->vr.last_avail_idx;
    q->notify_checked_used = q->vr.used_idx;
    q->kick_fd = cfg->kick_fd;
    q->call_fd = cfg->call_fd;
    q->in_round = 0;
    q->ndeferred = 0;
    q->stopping = 0;
    if ((err = set_nonblocking(cfg->kick_fd)) != 0 || (err = set_nonblocking(cfg->call_fd)) != 0)
        return err;
    q->started = 1;
    /* A queue resumed after a stop (new call fd, memory table, ...) may have completions
     * whose interrupt went to the old call fd: interrupt once. The driver checks the used
     * ring, so a spurious interrupt costs nothing, a lost one hangs its I/O. */
    if (q->call_fd >= 0 && q->vr.used_idx != 0 && signal_call(q, q->call_fd))
        STAT_ADD(q, notifications, 1);
    q->has_thread = 0;
    if (cfg->kick_fd < 0)
        return 0;
    q->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (q->stop_fd < 0) {
        q->started = 0;
        return -errno;
    }
    err = pthread_create(&q->thread, NULL, queue_worker, q);
    if (err) {
        close(q->stop_fd);
        q->stop_fd = -1;
        q->started = 0;
        return -err;
    }
    q->has_thread = 1;
    q->stats.running = 1;
    return 0;
}

int vpv_blk_queue_stop(struct vpv_blk *blk, uint32_t index)
{
    if (index >= VPV_MAX_QUEUES)
        return -EINVAL;
    struct vpv_queue *q = &blk->queues[index];
    if (!q->started)
        return -ENOENT;
    if (q->has_thread) {
        __atomic_store_n(&q->stopping, 1, __ATOMIC_RELAXED);
        uint64_t one = 1;
        while (write(q->stop_fd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
        if (join_worker(q) != 0) {
            /* Stuck in the kernel on the volume's file: leave it to finish on its own rather
             * than freeze the event loop. It keeps the device (guest memory mapped), its
             * io_uring and stop fd until it leaves; it no longer signals the frontend's fds,
             * which the control plane closes now; the queue cannot start again. */
            __atomic_store_n(&q->call_fd, -1, __ATOMIC_RELEASE);
            __atomic_store_n(&q->kick_fd, -1, __ATOMIC_RELEASE);
            /* References first, then the hand-over: a worker that leaves at this very moment
             * either finds abandoned == 1 and drops them, or has set 2 and is joined. */
            __atomic_add_fetch(&blk->refs, 1, __ATOMIC_ACQ_REL);
            __atomic_add_fetch(&blk->vol->abandoned_workers, 1, __ATOMIC_ACQ_REL);
            int running = 0;
            if (__atomic_compare_exchange_n(&q->abandoned, &running, 1, 0, __ATOMIC_ACQ_REL,
                                            __ATOMIC_ACQUIRE)) {
                __atomic_add_fetch(&stuck_workers, 1, __ATOMIC_RELAXED);
                pthread_detach(q->thread);
                q->has_thread = 0;
                q->started = 0;
                q->stats.running = 0;
                return -ETIMEDOUT;
            }
            __atomic_sub_fetch(&blk->vol->abandoned_workers, 1, __ATOMIC_RELEASE);
            __atomic_sub_fetch(&blk->refs, 1, __ATOMIC_RELEASE);
            pthread_join(q->thread, NULL);
        }
        close(q->stop_fd);
        q->stop_fd = -1;
        q->has_thread = 0;
    }
    q->started = 0;
    q->stats.running = 0;
    q->kick_fd = q->call_fd = -1;   /* owned by the control plane, which closes them */
    async_teardown(q);
    return q->vr.last_avail_idx;
}

int vpv_blk_queue_stats(struct vpv_blk *blk, uint32_t index, struct vpv_queue_stats *out)
{
    if (index >= VPV_MAX_QUEUES)
        return -EINVAL;
    const struct vpv_queue_stats *s = &blk->queues[index].stats;
    out->requests = __atomic_load_n(&s->requests, __ATOMIC_RELAXED);
    out->reads = __atomic_load_n(&s->reads, __ATOMIC_RELAXED);
    out->writes = __atomic_load_n(&s->writes, __ATOMIC_RELAXED);
    out->flushes = __atomic_load_n(&s->flushes, __ATOMIC_RELAXED);
    out->discards = __atomic_load_n(&s->discards, __ATOMIC_RELAXED);
    out->write_zeroes = __atomic_load_n(&s->write_zeroes, __ATOMIC_RELAXED);
    out->get_ids = __atomic_load_n(&s->get_ids, __ATOMIC_RELAXED);
    out->unsupported = __atomic_load_n(&s->unsupported, __ATOMIC_RELAXED);
    out->bytes_read = __atomic_load_n(&s->bytes_read, __ATOMIC_RELAXED);
    out->bytes_written = __atomic_load_n(&s->bytes_written, __ATOMIC_RELAXED);
    out->io_errors = __atomic_load_n(&s->io_errors, __ATOMIC_RELAXED);
    out->bad_requests = __atomic_load_n(&s->bad_requests, __ATOMIC_RELAXED);
    out->kicks = __atomic_load_n(&s->kicks, __ATOMIC_RELAXED);
    out->notifications = __atomic_load_n(&s->notifications, __ATOMIC_RELAXED);
    out->quarantined = __atomic_load_n(&s->quarantined, __ATOMIC_RELAXED);
    out->quarantine_refused = __atomic_load_n(&s->quarantine_refused, __ATOMIC_RELAXED);
    out->dangling_denied = __atomic_load_n(&s->dangling_denied, __ATOMIC_RELAXED);
    out->watchdog_notifications = __atomic_load_n(&s->watchdog_notifications, __ATOMIC_RELAXED);
    out->coalesced_wakes = __atomic_load_n(&s->coalesced_wakes, __ATOMIC_RELAXED);
    out->async_ios = __atomic_load_n(&s->async_ios, __ATOMIC_RELAXED);
    out->polled_wakes = __atomic_load_n(&s->polled_wakes, __ATOMIC_RELAXED);
    out->direct_fallbacks = __atomic_load_n(&s->direct_fallbacks, __ATOMIC_RELAXED);
    out->last_avail_idx = __atomic_load_n(&s->last_avail_idx, __ATOMIC_RELAXED);
    out->running = __atomic_load_n(&s->running, __ATOMIC_RELAXED);
    out->broken = __atomic_load_n(&s->broken, __ATOMIC_RELAXED);
    out->_pad = 0;
    out->guest_faults = __atomic_load_n(&s->guest_faults, __ATOMIC_RELAXED);
    out->calls_saturated = __atomic_load_n(&s->calls_saturated, __ATOMIC_RELAXED);
    return 0;
}

int vpv_blk_queue_inflight(struct vpv_blk *blk, uint32_t index)
{
    if (index >= VPV_MAX_QUEUES)
        return -EINVAL;
    return (int)vpv_vring_inflight_count(&blk->queues[index].vr);
}
