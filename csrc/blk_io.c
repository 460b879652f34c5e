/*
 * blk_io.c: the I/O engine of the virtio-blk data path (blk.c): how a request's data moves
 * between the volume file and guest memory.
 *
 * Each queue has an io_uring with VPV_ASYNC_SLOTS slots (setup / teardown, prepare, submit,
 * reap, drain, abandon on a broken queue); whatever cannot go there (no io_uring, writes
 * through the page cache, VPV_BLK_SYNC_IO, O_DIRECT refusing an alignment, short transfers)
 * is done synchronously with preadv/pwritev (blk_rw_full, blk_data_rw); and FLUSH is an
 * fdatasync that remembers a writeback failure. It is separate from the request logic
 * (blk.c) and the worker (blk_worker.c) because it is the part that depends on the kernel's
 * I/O interfaces: a change of engine stays in this file.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "blk_internal.h"

/* Full-length positional vector I/O: retries short transfers and EINTR. */
int blk_rw_full(int fd, struct iovec *iov, uint32_t n, off_t off, size_t total, int write)
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
int blk_data_rw(struct vpv_queue *q, struct iovec *iov, uint32_t n, off_t off, size_t len, int write)
{
    struct vpv_blk *blk = q->blk;
    if (blk->direct_fd >= 0) {
        int rc = blk_rw_full(blk->direct_fd, iov, n, off, len, write);
        if (rc != -EINVAL)
            return rc;
        STAT_ADD(q, direct_fallbacks, 1);
    }
    return blk_rw_full(blk->fd, iov, n, off, len, write);
}

/* fdatasync reports a writeback error to an open file once: the pages whose writeback
 * failed are then clean (or gone) in the page cache, and the next fdatasync answers 0
 * although their data never reached the disk. So the first failure is remembered for the
 * volume and every later FLUSH, on any connection, fails too (as QEMU does after a failed
 * flush) until the volume is opened again: a guest never hears OK for writes it lost. */
uint8_t blk_flush_file(struct vpv_blk *blk)
{
    int *failed = &blk->vol->writeback_failed;
    if (__atomic_load_n(failed, __ATOMIC_ACQUIRE))
        return VIRTIO_BLK_S_IOERR;
    if (fdatasync(blk->fd) == 0)
        return VIRTIO_BLK_S_OK;
    __atomic_store_n(failed, 1, __ATOMIC_RELEASE);
    return VIRTIO_BLK_S_IOERR;
}

/* Hand a read or write to the io_uring when this queue has one and a free slot; it is
 * completed by blk_async_reap. Returns the slot, or NULL when the request must be done
 * synchronously. Called inside a round (flip lock held, state checked). */
struct async_slot *blk_async_prepare(struct vpv_queue *q, struct iovec *iov, uint32_t n, off_t off,
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
    if (q->inflight++ == 0)   /* the wait for a completion starts now */
        __atomic_store_n(&q->uring_progress_ns, coarse_ns(), __ATOMIC_RELAXED);
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
        res = blk_rw_full(q->blk->fd, slot->iov, slot->niov, (off_t)slot->off, slot->len, slot->write);
        if (res == 0)
            res = (int)slot->len;
    }
    if (res < 0) {
        status = VIRTIO_BLK_S_IOERR;
    } else if ((uint64_t)res < slot->len) {
        /* Short: the rest through the page cache (it may no longer be aligned for O_DIRECT). */
        uint32_t n = slot->niov;
        struct iovec *rest = iov_skip(slot->iov, &n, (size_t)res);
        if (blk_rw_full(q->blk->fd, rest, n, (off_t)(slot->off + (uint64_t)res), slot->len - (uint64_t)res,
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
    blk_complete(q, head, status_ptr, status, written);
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

void blk_async_submit(struct vpv_queue *q)
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
uint32_t blk_async_reap(struct vpv_queue *q, uint32_t wait)
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
                    blk_complete(q, head, status_ptr, VIRTIO_BLK_S_IOERR, 0);
                    done++;
                }
            }
            break;
        }
        struct async_slot *slot = io_uring_cqe_get_data(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&q->uring, cqe);
        storage_enter(q);   /* a fallback or the rest of a short transfer is done inline */
        async_complete(q, slot, res);   /* releases the slot */
        storage_leave(q);
        __atomic_store_n(&q->uring_progress_ns, coarse_ns(), __ATOMIC_RELAXED);
        done++;
    }
    return done;
}

/* A broken queue's requests still in flight: wait for each (the kernel finishes I/O into
 * memory that vanished with EFAULT, it does not hang) and free its slot without touching
 * guest memory; nothing is published on a broken ring. */
void blk_async_abandon(struct vpv_queue *q)
{
    if (!q->slots)
        return;
    blk_async_submit(q);
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
void blk_async_drain(struct vpv_queue *q)
{
    if (!q->slots)
        return;
    if (__atomic_load_n(&q->stats.broken, __ATOMIC_RELAXED)) {
        blk_async_abandon(q);
        return;
    }
    blk_async_submit(q);
    blk_async_reap(q, q->inflight);
}

/* The queue's io_uring, its slots and its completion eventfd. Without an io_uring
 * (kernel.io_uring_disabled, old kernels) the data I/O is synchronous: slower, still
 * correct. */
void blk_async_setup(struct vpv_queue *q)
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

void blk_async_teardown(struct vpv_queue *q)
{
    if (!q->slots)
        return;
    blk_async_drain(q);
    io_uring_queue_exit(&q->uring);
    close(q->uring_efd);
    q->uring_efd = -1;
    free(q->slots);
    q->slots = NULL;
}

