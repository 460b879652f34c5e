/*
 * blk.c: virtio-blk requests on a volume, one worker thread per virtqueue.
 *
 * This file holds the device (vpv_blk_new / free / memory table, its reference count) and
 * the requests: parsing and executing a chain, the dangling branch and its quarantine into
 * the volume's ring, completion, the deferred acknowledgement of quarantined writes, and a
 * round of requests under the flip lock. How the data moves is blk_io.c (io_uring or
 * synchronous); when the ring is looked at is blk_worker.c (the worker thread, polling, the
 * stop). They are separate files so each concern reads on its own; blk_internal.h holds
 * the state they share.
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
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "blk_internal.h"

/* The last reference (vpv_blk_free, or the last worker a stop gave up on) frees the device:
 * guest memory stays mapped while any worker may still complete a request into it. */
void blk_unref(struct vpv_blk *blk)
{
    if (__atomic_sub_fetch(&blk->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    for (uint32_t i = 0; i < VPV_MAX_QUEUES; i++) {
        blk_async_teardown(&blk->queues[i]);   /* a queue whose start failed after blk_async_setup */
        free(blk->queues[i].bounce);
    }
    vpv_memory_unmap(&blk->mem);
    close(blk->broken_fd);
    free(blk);
}

/* A queue stopped serving (corrupt ring, lost memory): tell the control plane. */
void blk_report_broken(struct vpv_queue *q)
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
    blk_worker_init();
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
            if (blk_rw_full(blk->fd, wr, n_wr, off, wr_len, 0) != 0)
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
        return blk_flush_file(blk);
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
        if ((*slot_out = blk_async_prepare(q, wr, n_wr, off, wr_len, 0)) != NULL)
            return STATUS_PENDING;
        if (blk_data_rw(q, wr, n_wr, off, wr_len, 0) != 0)
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
        if ((*slot_out = blk_async_prepare(q, rd, n_rd, off, rd_len, 1)) != NULL)
            return STATUS_PENDING;
        if (blk_data_rw(q, rd, n_rd, off, rd_len, 1) != 0)
            return VIRTIO_BLK_S_IOERR;
        STAT_ADD(q, bytes_written, rd_len);
        return VIRTIO_BLK_S_OK;
    }
    case VIRTIO_BLK_T_FLUSH:
        STAT_ADD(q, flushes, 1);
        blk_async_drain(q);   /* let it cover every write this queue has in flight too */
        return blk_flush_file(blk);
    case VIRTIO_BLK_T_GET_ID: {
        STAT_ADD(q, get_ids, 1);
        size_t len = wr_len < VPV_SERIAL_BYTES ? wr_len : VPV_SERIAL_BYTES;
        *data_written = (uint32_t)iov_copy_in(wr, n_wr, blk->serial, len);
        return VIRTIO_BLK_S_OK;
    }
    case VIRTIO_BLK_T_DISCARD:
        STAT_ADD(q, discards, 1);
        blk_async_drain(q);   /* never punch under a write still in flight */
        return do_discard(q, rd, n_rd, rd_len, hdr.type);
    case VIRTIO_BLK_T_WRITE_ZEROES:
        STAT_ADD(q, write_zeroes, 1);
        blk_async_drain(q);
        return do_discard(q, rd, n_rd, rd_len, hdr.type);
    default:
        STAT_ADD(q, unsupported, 1);
        return VIRTIO_BLK_S_UNSUPP;
    }
}

/* Where a finished request's status goes, and its used entry. */
void blk_complete(struct vpv_queue *q, uint16_t head, uint8_t *status_ptr, uint8_t status,
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
        blk_complete(q, d->head, d->status_ptr, err ? VIRTIO_BLK_S_IOERR : d->status, 0);
    }
}

/* Drain the ring once, in rounds. Returns requests taken (completed or in flight) or -EIO
 * when the ring is corrupt. Stops early, leaving requests in the ring, when every io_uring
 * slot is busy: a completion wakes the worker for the rest. */
int blk_process_ring(struct vpv_queue *q)
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
                blk_async_drain(q);
                q->in_round = 0;
                vpv_volume_end_request(q->blk->vol);
                blk_report_broken(q);
                return -EIO;
            }
            STAT_ADD(q, requests, 1);
            __atomic_store_n(&q->busy_since_ns, coarse_ns(), __ATOMIC_RELAXED);
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
                storage_enter(q);
                status = execute(q, c, &written, &slot);
                storage_leave(q);
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
            blk_complete(q, c->head, status_ptr, status, written);
        }
        /* Submitted inside the round: a write is counted in flight before a flip can run. */
        blk_async_submit(q);
        publish_deferred(q);
        q->in_round = 0;
        vpv_volume_end_request(q->blk->vol);
    }
    __atomic_store_n(&q->stats.last_avail_idx, q->vr.last_avail_idx, __ATOMIC_RELAXED);
    if (taken && q->blk->vol->super_dirty) {
        storage_enter(q);
        vpv_volume_ring_sync(q->blk->vol);   /* once per batch, not per quarantined record */
        storage_leave(q);
    }
    return taken;
}
