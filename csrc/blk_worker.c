/*
 * blk_worker.c: the queue worker of the virtio-blk data path (blk.c): one thread per
 * started virtqueue, and everything about when the ring is looked at.
 *
 * The worker sleeps in poll() on the kick, stop and io_uring completion eventfds, polls the
 * avail ring adaptively after a pass, coalesces kicks, re-interrupts an idle driver from a
 * watchdog, and runs every pass under the SIGBUS guard (a fault breaks the queue, not the
 * process). Queue start / stop live here too: the stop joins the worker, interrupts it when
 * a frontend's fd blocks it, and gives up on one stuck in the kernel. It is separate from
 * the request logic (blk.c) and the I/O engine (blk_io.c) because it is the only part that
 * deals with threads, signals and time.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "blk_internal.h"

/* Interrupt the driver through its call eventfd without ever blocking. The fd is
 * non-blocking (vpv_blk_queue_start): a full counter (a frontend that never reads it, or one
 * that filled it on purpose) gives EAGAIN, and then an interrupt is pending anyway. */
static int signal_call(struct vpv_queue *q, int fd)
{
    uint64_t one = 1;
    for (;;) {
        if (write(fd, &one, sizeof(one)) == sizeof(one))
            return 1;
        if (errno == EAGAIN)
            STAT_ADD(q, calls_saturated, 1);
        /* EINTR: the frontend cleared O_NONBLOCK on the description it shares with us and
         * the write blocked; the stop interrupted it (join_worker's stop signal). */
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

/* Process-wide set-up for the workers, once (vpv_blk_new): the stop's interrupting signal. */
void blk_worker_init(void)
{
    pthread_once(&unstick_once, unstick_install);
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
    blk_report_broken(q);   /* blk_async_drain abandons from now on */
    blk_async_abandon(q);
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
        int n = blk_process_ring(q);
        if (n < 0)
            return n;
        uint32_t reaped = q->slots ? blk_async_reap(q, 0) : 0;
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
            blk_async_drain(q);
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
            __atomic_store_n(&q->busy_since_ns, coarse_ns(), __ATOMIC_RELAXED);
            if (queue_pass(q) == -EIO)
                fds[0].fd = -1;
            continue;
        }
        __atomic_add_fetch(&q->heartbeats, 1, __ATOMIC_RELAXED);
        __atomic_store_n(&q->busy_since_ns, 0, __ATOMIC_RELAXED);
        uint64_t slept_from = monotonic_ns();
        int ready = poll(fds, 3, WATCHDOG_MS);
        uint64_t slept = monotonic_ns() - slept_from;
        __atomic_store_n(&q->busy_since_ns, coarse_ns(), __ATOMIC_RELAXED);
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
    blk_async_drain(q);
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
        blk_async_teardown(q);
        close(q->stop_fd);
        q->stop_fd = -1;
        __atomic_sub_fetch(&blk->vol->abandoned_workers, 1, __ATOMIC_RELEASE);
        blk_unref(blk);
    }
    return NULL;
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
    q->busy_since_ns = 0;
    q->uring_progress_ns = 0;
    q->storage_since_ns = 0;
    q->coalescing = 0;
    q->wakes = 0;
    if (!q->slots && !(blk->flags & VPV_BLK_SYNC_IO))
        blk_async_setup(q);
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
    blk_async_teardown(q);
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

int vpv_blk_queue_health(struct vpv_blk *blk, uint32_t index, struct vpv_queue_health *out)
{
    if (index >= VPV_MAX_QUEUES)
        return -EINVAL;
    struct vpv_queue *q = &blk->queues[index];
    uint64_t now = coarse_ns();
    memset(out, 0, sizeof(*out));
    out->has_worker = (uint32_t)q->has_thread;
    if (!q->has_thread)
        return 0;
    out->heartbeats = __atomic_load_n(&q->heartbeats, __ATOMIC_RELAXED);
    uint64_t busy = __atomic_load_n(&q->busy_since_ns, __ATOMIC_RELAXED);
    out->busy_ns = busy && now > busy ? now - busy : 0;
    /* inflight is the worker's own counter: a racy read only shifts the answer by a turn. */
    uint64_t progress = __atomic_load_n(&q->uring_progress_ns, __ATOMIC_RELAXED);
    if (__atomic_load_n(&q->inflight, __ATOMIC_RELAXED) > 0 && progress && now > progress)
        out->uring_wait_ns = now - progress;
    uint64_t storage = __atomic_load_n(&q->storage_since_ns, __ATOMIC_RELAXED);
    out->storage_wait_ns = storage && now > storage ? now - storage : 0;
    return 0;
}

int vpv_blk_queue_inflight(struct vpv_blk *blk, uint32_t index)
{
    if (index >= VPV_MAX_QUEUES)
        return -EINVAL;
    return (int)vpv_vring_inflight_count(&blk->queues[index].vr);
}
