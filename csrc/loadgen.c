/*
 * loadgen.c: the data path of a vhost-user-blk *frontend*, for `vhost-pv loadgen`.
 *
 * We play the guest driver: the rings and buffers live in our own memfd mapping, which the
 * backend (vhost-pv, qemu-storage-daemon, anything speaking vhost-user-blk) also maps. One
 * thread per queue keeps iodepth requests in flight: each request is three descriptors
 * (16-byte virtio_blk_outhdr, the data, a 1-byte status), published through the available
 * ring with a release store of avail->idx, announced with a kick only when the device asks
 * for one (EVENT_IDX: avail_event; otherwise VRING_USED_F_NO_NOTIFY), and collected from the
 * used ring after an acquire load of used->idx. While nothing is used we sleep in poll() on
 * the call eventfd, having told the device (used_event) that the next entry should interrupt.
 *
 * The device is trusted less than the guest would trust it: used ids are checked against the
 * requests we have in flight, and a device that stops answering ends the run (-ETIMEDOUT)
 * instead of hanging it. Verify mode gives every block a pattern that is a pure function of
 * (seed, block, generation); a per-block busy flag keeps two requests (on any queue) off the
 * same block, so the generation a read expects cannot change under it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "loadgen.h"
#include "virtio_blk.h"
#include "vring.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "loadgen.c writes virtio's little-endian ring fields natively"
#endif

#define STATUS_UNSET 0xFF
#define POISON_BYTE 0x5A
#define DESC_PER_REQ 3
#define WAIT_SLICE_MS 100   /* poll() at most this long, to notice stop and the deadline */
#define RANDOM_TRIES 64     /* verify: random picks of a busy block before probing linearly */

enum phase { PHASE_PREFILL, PHASE_MAIN, PHASE_CHECK };
enum pick { PICK_OK, PICK_DONE };

struct lg_slot {
    uint64_t block;
    uint64_t submit_ns;
    uint32_t gen;          /* write: the generation written; read: the one expected (0: none) */
    uint8_t is_write;
    uint8_t busy;
};

/* A barrier whose count can drop (pthread_barrier_t's cannot): if a thread fails to start,
 * the others must not wait for it. */
struct lg_barrier {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint32_t count;
    uint32_t waiting;
    uint32_t round;
};

struct lg_run;

struct lg_queue {
    struct lg_run *run;
    const struct vpv_lg_queue *cfg;
    struct vpv_lg_result *res;
    uint32_t index;
    uint32_t num;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t *used_event;   /* avail->ring[num] */
    uint16_t *avail_event;  /* used->ring[num] */
    uint16_t avail_idx;     /* our shadow of avail->idx */
    uint16_t last_used;
    struct blk_req_header *hdr;
    uint8_t *status;
    uint8_t *data;
    uint64_t hdr_gpa, status_gpa, data_gpa;
    struct lg_slot *slots;
    uint32_t *free_slots;
    uint32_t nfree;
    uint32_t inflight;
    uint64_t rng;
    uint64_t seq_next;      /* sequential workloads: the next block */
    uint64_t cursor;        /* prefill/check: the next block of this queue's slice */
    uint64_t slice_end;     /* prefill/check: end of the slice */
    uint64_t last_progress_ns;
    enum phase phase;
};

struct lg_run {
    struct vpv_lg_config *cfg;
    uint64_t nblocks;
    uint64_t sectors_per_block;
    uint8_t *busy;          /* verify: one flag per block */
    uint32_t nqueues;
    uint32_t abort;         /* a queue failed: the others stop */
    struct lg_barrier barrier;
    uint64_t main_deadline_ns;
    struct lg_queue *queues;
};

/* -- helpers -------------------------------------------------------------------------------- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

#define GOLDEN 0x9e3779b97f4a7c15ull

static inline uint64_t splitmix64(uint64_t *state)
{
    *state += GOLDEN;
    return mix64(*state);
}

/* A uniform integer in [0, n) (Lemire's multiply; the bias is below 2^-32 for our n). */
static inline uint64_t rand_below(uint64_t *state, uint64_t n)
{
    return (uint64_t)(((unsigned __int128)splitmix64(state) * n) >> 64);
}

static inline uint64_t pattern_base(uint64_t seed, uint64_t block, uint32_t generation)
{
    return mix64(mix64(seed ^ mix64(block + 1)) + (uint64_t)generation * GOLDEN);
}

void vpv_lg_pattern(uint64_t seed, uint64_t block, uint32_t generation, uint8_t *buf, uint32_t len)
{
    uint64_t state = pattern_base(seed, block, generation);
    for (uint32_t off = 0; off + 8 <= len; off += 8) {
        uint64_t word = splitmix64(&state);
        memcpy(buf + off, &word, 8);
    }
}

/* The first byte offset where buf differs from the pattern, or -1. */
static int64_t pattern_mismatch(uint64_t seed, uint64_t block, uint32_t generation,
                                const uint8_t *buf, uint32_t len)
{
    uint64_t state = pattern_base(seed, block, generation);
    for (uint32_t off = 0; off + 8 <= len; off += 8) {
        uint64_t word = splitmix64(&state), got;
        memcpy(&got, buf + off, 8);
        if (got != word)
            return off;
    }
    return -1;
}

uint32_t vpv_lg_hist_bucket(uint64_t ns)
{
    const uint32_t sub = 1u << VPV_LG_HIST_SUB_BITS;
    if (ns < 2 * sub)
        return (uint32_t)ns;
    uint32_t e = 63 - (uint32_t)__builtin_clzll(ns);
    uint64_t index = ((uint64_t)(e - VPV_LG_HIST_SUB_BITS) << VPV_LG_HIST_SUB_BITS) +
                     (ns >> (e - VPV_LG_HIST_SUB_BITS));
    return index < VPV_LG_HIST_BUCKETS ? (uint32_t)index : VPV_LG_HIST_BUCKETS - 1;
}

double vpv_lg_hist_value(uint32_t bucket)
{
    const uint32_t sub = 1u << VPV_LG_HIST_SUB_BITS;
    if (bucket < 2 * sub)
        return bucket;
    uint32_t e = (bucket >> VPV_LG_HIST_SUB_BITS) + VPV_LG_HIST_SUB_BITS - 1;
    uint64_t m = (bucket & (sub - 1)) + sub;
    uint64_t width = 1ull << (e - VPV_LG_HIST_SUB_BITS);
    return (double)(m * width) + (double)width / 2.0;
}

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

/* Area layout: headers (16 each), status bytes (1 each), then 4096-aligned data buffers. */
static uint64_t area_status_off(uint32_t iodepth)
{
    return (uint64_t)sizeof(struct blk_req_header) * iodepth;
}

static uint64_t area_data_off(uint32_t iodepth)
{
    return align_up(area_status_off(iodepth) + iodepth, 4096);
}

uint64_t vpv_lg_area_size(uint32_t iodepth, uint32_t bs)
{
    return area_data_off(iodepth) + (uint64_t)iodepth * bs;
}

/* backend utime + stime in clock ticks, from /proc/PID/stat (fields 14 and 15). */
static int proc_cpu_ticks(int pid, uint64_t *out)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -EIO;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p)
        return -EIO;
    /* After ")": state is field 3, utime 14, stime 15. */
    unsigned long long utime, stime;
    if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime) != 2)
        return -EIO;
    *out = utime + stime;
    return 0;
}

static void barrier_init(struct lg_barrier *b, uint32_t count)
{
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->cond, NULL);
    b->count = count;
    b->waiting = 0;
    b->round = 0;
}

static void barrier_release_locked(struct lg_barrier *b)
{
    if (b->waiting > 0 && b->waiting >= b->count) {
        b->waiting = 0;
        b->round++;
        pthread_cond_broadcast(&b->cond);
    }
}

static void barrier_wait(struct lg_barrier *b)
{
    pthread_mutex_lock(&b->lock);
    uint32_t round = b->round;
    b->waiting++;
    barrier_release_locked(b);
    while (round == b->round)
        pthread_cond_wait(&b->cond, &b->lock);
    pthread_mutex_unlock(&b->lock);
}

static void barrier_set_count(struct lg_barrier *b, uint32_t count)
{
    pthread_mutex_lock(&b->lock);
    b->count = count;
    barrier_release_locked(b);
    pthread_mutex_unlock(&b->lock);
}

static void barrier_destroy(struct lg_barrier *b)
{
    pthread_cond_destroy(&b->cond);
    pthread_mutex_destroy(&b->lock);
}

/* -- the ring ------------------------------------------------------------------------------- */

static void *host_of(const struct vpv_lg_config *cfg, uint64_t gpa, uint64_t len, int *ok)
{
    if (gpa < cfg->mem_gpa || gpa - cfg->mem_gpa > cfg->mem_size ||
        len > cfg->mem_size - (gpa - cfg->mem_gpa)) {
        *ok = 0;
        return NULL;
    }
    return (uint8_t *)(uintptr_t)cfg->mem_host + (gpa - cfg->mem_gpa);
}

static inline int need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

/* Make everything added since `old` visible to the device, and kick if it wants one. */
static void publish(struct lg_queue *q, uint16_t old)
{
    if (q->avail_idx == old)
        return;
    __atomic_store_n(&q->avail->idx, q->avail_idx, __ATOMIC_RELEASE);
    /* The device may be about to sleep: our idx store must be visible before we read what
     * it asked for (it does the mirror image: publish its event, fence, re-read our idx). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int kick;
    if (q->run->cfg->flags & VPV_LG_F_EVENT_IDX)
        kick = need_event(__atomic_load_n(q->avail_event, __ATOMIC_RELAXED), q->avail_idx, old);
    else
        kick = !(__atomic_load_n(&q->used->flags, __ATOMIC_RELAXED) & VRING_USED_F_NO_NOTIFY);
    if (kick) {
        uint64_t one = 1;
        if (write(q->cfg->kick_fd, &one, sizeof(one)) == sizeof(one))
            q->res->kicks++;
    }
}

static void submit(struct lg_queue *q, uint64_t block, int is_write, uint32_t gen)
{
    struct lg_run *run = q->run;
    const struct vpv_lg_config *cfg = run->cfg;
    uint32_t slot = q->free_slots[--q->nfree];
    struct lg_slot *s = &q->slots[slot];
    uint8_t *data = q->data + (uint64_t)slot * cfg->bs;

    s->block = block;
    s->is_write = (uint8_t)is_write;
    s->gen = gen;
    s->busy = 1;
    q->hdr[slot].type = is_write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    q->hdr[slot].reserved = 0;
    q->hdr[slot].sector = block * run->sectors_per_block;
    q->desc[slot * DESC_PER_REQ + 1].flags = VRING_DESC_F_NEXT | (is_write ? 0 : VRING_DESC_F_WRITE);
    q->status[slot] = STATUS_UNSET;
    if (cfg->flags & VPV_LG_F_VERIFY) {
        if (is_write)
            vpv_lg_pattern(cfg->seed, block, gen, data, cfg->bs);
        else if (gen)
            memset(data, POISON_BYTE, cfg->bs);  /* a read that writes nothing cannot pass */
    }
    q->avail->ring[q->avail_idx % q->num] = (uint16_t)(slot * DESC_PER_REQ);
    q->avail_idx++;
    q->inflight++;
    s->submit_ns = now_ns();
}

/* Claim a block for a request (verify: nobody else may have it in flight). */
static int claim(struct lg_run *run, uint64_t block)
{
    if (!run->busy)
        return 1;
    return __atomic_exchange_n(&run->busy[block], 1, __ATOMIC_ACQUIRE) == 0;
}

static void release_block(struct lg_run *run, uint64_t block)
{
    if (run->busy)
        __atomic_store_n(&run->busy[block], 0, __ATOMIC_RELEASE);
}

/* The next request of the current phase: block and direction; PICK_DONE when the phase has
 * nothing more to submit. */
static enum pick pick_next(struct lg_queue *q, uint64_t *block, int *is_write)
{
    struct lg_run *run = q->run;
    const struct vpv_lg_config *cfg = run->cfg;
    uint32_t *gens = cfg->generations;
    uint64_t n = run->nblocks;

    if (q->phase != PHASE_MAIN) {
        int prefill = q->phase == PHASE_PREFILL;
        while (q->cursor < q->slice_end) {
            uint64_t b = q->cursor++;
            if ((gens[b] == 0) == prefill && claim(run, b)) {
                *block = b;
                *is_write = prefill;
                return PICK_OK;
            }
        }
        return PICK_DONE;
    }

    switch (cfg->rw) {
    case VPV_LG_READ:
    case VPV_LG_WRITE:
        *is_write = cfg->rw == VPV_LG_WRITE;
        /* Total in flight over all queues is below n (checked), so a free block exists. */
        for (uint64_t tries = 0; tries < n; tries++) {
            uint64_t b = q->seq_next;
            q->seq_next = b + 1 == n ? 0 : b + 1;
            if (claim(run, b)) {
                *block = b;
                return PICK_OK;
            }
        }
        return PICK_DONE;
    default: {
        if (cfg->rw == VPV_LG_RANDRW)
            *is_write = rand_below(&q->rng, 100) >= cfg->rwmix_read;
        else
            *is_write = cfg->rw == VPV_LG_RANDWRITE;
        uint64_t b = rand_below(&q->rng, n);
        int got = claim(run, b);
        for (int i = 0; !got && i < RANDOM_TRIES; i++) {
            b = rand_below(&q->rng, n);
            got = claim(run, b);
        }
        /* Still busy after the random tries: probe forward (a free block exists). */
        for (uint64_t tries = 0; !got && tries < n; tries++) {
            b = b + 1 == n ? 0 : b + 1;
            got = claim(run, b);
        }
        *block = b;
        return got ? PICK_OK : PICK_DONE;
    }
    }
}

static void record_bad(struct vpv_lg_result *res, uint64_t sector)
{
    if (res->nbad < VPV_LG_MAX_BAD)
        res->bad_sectors[res->nbad++] = sector;
}

/* One used entry: check it, account for it, free its slot and block. 0 or -EPROTO. */
static int complete(struct lg_queue *q, uint32_t id, uint64_t now)
{
    struct lg_run *run = q->run;
    const struct vpv_lg_config *cfg = run->cfg;
    struct vpv_lg_result *res = q->res;
    if (id % DESC_PER_REQ || id / DESC_PER_REQ >= cfg->iodepth ||
        !q->slots[id / DESC_PER_REQ].busy)
        return -EPROTO;
    uint32_t slot = id / DESC_PER_REQ;
    struct lg_slot *s = &q->slots[slot];
    uint8_t status = __atomic_load_n(&q->status[slot], __ATOMIC_RELAXED);
    int ok = status == VIRTIO_BLK_S_OK;

    if (!ok)
        res->errors++;
    if (cfg->flags & VPV_LG_F_VERIFY) {
        if (s->is_write) {
            /* A failed write leaves the block unknown: no read checks it again. */
            cfg->generations[s->block] = ok ? s->gen : 0;
        } else if (ok && s->gen) {
            const uint8_t *data = q->data + (uint64_t)slot * cfg->bs;
            int64_t off = pattern_mismatch(cfg->seed, s->block, s->gen, data, cfg->bs);
            res->verified++;
            if (off >= 0) {
                res->mismatches++;
                record_bad(res, s->block * run->sectors_per_block + (uint64_t)off / VPV_SECTOR_SIZE);
            }
        }
    }
    release_block(run, s->block);

    switch (q->phase) {
    case PHASE_PREFILL:
        res->prefill_ios++;
        break;
    case PHASE_CHECK:
        res->check_ios++;
        break;
    case PHASE_MAIN: {
        uint64_t lat = now - s->submit_ns;
        res->ios++;
        res->bytes += cfg->bs;
        if (s->is_write)
            res->writes++;
        else
            res->reads++;
        res->lat_sum_ns += lat;
        if (lat > res->lat_max_ns)
            res->lat_max_ns = lat;
        res->hist[vpv_lg_hist_bucket(lat)]++;
        break;
    }
    }
    s->busy = 0;
    q->free_slots[q->nfree++] = slot;
    q->inflight--;
    return 0;
}

/* Collect every used entry there is; returns how many, or -EPROTO. */
static int reap(struct lg_queue *q)
{
    uint16_t used_idx = __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE);
    if (used_idx == q->last_used)
        return 0;
    if ((uint16_t)(used_idx - q->last_used) > q->inflight)
        return -EPROTO;  /* more used entries than requests in flight */
    uint64_t now = now_ns();
    int n = 0;
    while (q->last_used != used_idx) {
        struct vring_used_elem *e = &q->used->ring[q->last_used % q->num];
        int err = complete(q, e->id, now);
        if (err)
            return err;
        q->last_used++;
        n++;
    }
    return n;
}

/* Sleep until the device signals the call eventfd (or WAIT_SLICE_MS). */
static void wait_call(struct lg_queue *q)
{
    struct pollfd pfd = {.fd = q->cfg->call_fd, .events = POLLIN};
    q->res->waits++;
    if (poll(&pfd, 1, WAIT_SLICE_MS) > 0) {
        uint64_t count;
        ssize_t r = read(q->cfg->call_fd, &count, sizeof(count));
        (void)r;  /* EAGAIN when another wake already drained it */
    }
}

static int stopping(const struct lg_queue *q)
{
    return __atomic_load_n(&q->run->abort, __ATOMIC_RELAXED) ||
           __atomic_load_n(&q->run->cfg->stop, __ATOMIC_RELAXED);
}

/* Run one phase on one queue until it has nothing more to do and nothing in flight. */
static int run_phase(struct lg_queue *q, enum phase phase)
{
    struct lg_run *run = q->run;
    const struct vpv_lg_config *cfg = run->cfg;
    const uint64_t timeout_ns = (uint64_t)cfg->timeout_ms * 1000000ull;
    int done = 0;

    q->phase = phase;
    if (phase != PHASE_MAIN) {
        uint64_t per = (run->nblocks + run->nqueues - 1) / run->nqueues;
        q->cursor = per * q->index < run->nblocks ? per * q->index : run->nblocks;
        q->slice_end = q->cursor + per < run->nblocks ? q->cursor + per : run->nblocks;
    }
    q->last_progress_ns = now_ns();
    for (;;) {
        if (!done) {
            done = stopping(q) ||
                   (phase == PHASE_MAIN && now_ns() >= run->main_deadline_ns);
        }
        uint16_t old = q->avail_idx;
        while (!done && q->nfree > 0) {
            uint64_t block;
            int is_write;
            if (pick_next(q, &block, &is_write) == PICK_DONE) {
                done = 1;
                break;
            }
            uint32_t gen = 0;
            if (cfg->flags & VPV_LG_F_VERIFY) {
                gen = cfg->generations[block];
                if (is_write && ++gen == 0)
                    gen = 1;
            }
            submit(q, block, is_write, gen);
        }
        publish(q, old);
        if (done && q->inflight == 0)
            return 0;

        int n = reap(q);
        if (n < 0)
            return n;
        if (n > 0) {
            q->last_progress_ns = now_ns();
            continue;
        }
        /* Nothing used yet: ask for an interrupt at the next entry, then look once more
         * (the device may have added it before it could see used_event). */
        if (cfg->flags & VPV_LG_F_EVENT_IDX)
            __atomic_store_n(q->used_event, q->last_used, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE) != q->last_used)
            continue;
        wait_call(q);
        if (now_ns() - q->last_progress_ns > timeout_ns &&
            __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE) == q->last_used)
            return -ETIMEDOUT;
    }
}

static void fail(struct lg_queue *q, int err)
{
    if (!q->res->status)
        q->res->status = err;
    __atomic_store_n(&q->run->abort, 1, __ATOMIC_RELAXED);
}

static void *queue_thread(void *arg)
{
    struct lg_queue *q = arg;
    struct lg_run *run = q->run;
    struct vpv_lg_config *cfg = run->cfg;
    int err;

    if ((cfg->flags & VPV_LG_F_PREFILL) && !q->res->status && (err = run_phase(q, PHASE_PREFILL)))
        fail(q, err);

    /* Every queue starts the timed phase together, after every prefill write completed. */
    barrier_wait(&run->barrier);
    if (q->index == 0) {
        uint64_t ticks;
        run->main_deadline_ns = now_ns() + cfg->runtime_ns;
        if (cfg->backend_pid > 0 && proc_cpu_ticks(cfg->backend_pid, &ticks) == 0) {
            cfg->backend_cpu_ticks = ticks;
            cfg->backend_cpu_ok = 1;
        }
    }
    barrier_wait(&run->barrier);

    uint64_t start = now_ns(), cpu = thread_cpu_ns();
    if (!q->res->status && (err = run_phase(q, PHASE_MAIN)))
        fail(q, err);
    q->res->elapsed_ns = now_ns() - start;
    q->res->cpu_ns = thread_cpu_ns() - cpu;

    barrier_wait(&run->barrier);
    if (q->index == 0 && cfg->backend_cpu_ok) {
        uint64_t ticks;
        if (proc_cpu_ticks(cfg->backend_pid, &ticks) == 0)
            cfg->backend_cpu_ticks = ticks - cfg->backend_cpu_ticks;
        else
            cfg->backend_cpu_ok = 0;
    }

    if ((cfg->flags & VPV_LG_F_CHECK) && !q->res->status && !stopping(q) &&
        (err = run_phase(q, PHASE_CHECK)))
        fail(q, err);
    return NULL;
}

/* -- setup ---------------------------------------------------------------------------------- */

static int check_config(const struct vpv_lg_config *cfg, const struct vpv_lg_queue *queues,
                        uint32_t nqueues)
{
    if (nqueues == 0 || nqueues > VPV_LG_MAX_QUEUES || cfg->rw > VPV_LG_RANDRW ||
        cfg->bs == 0 || cfg->bs % VPV_SECTOR_SIZE || cfg->iodepth == 0 ||
        cfg->iodepth > VPV_LG_MAX_IODEPTH || cfg->rwmix_read > 100 || cfg->timeout_ms == 0 ||
        cfg->capacity < cfg->bs || cfg->mem_size == 0)
        return -EINVAL;
    uint64_t nblocks = cfg->capacity / cfg->bs;
    if (cfg->flags & VPV_LG_F_VERIFY) {
        if (!cfg->generations || nblocks <= (uint64_t)cfg->iodepth * nqueues)
            return -EINVAL;
    } else if (cfg->flags & (VPV_LG_F_PREFILL | VPV_LG_F_CHECK)) {
        return -EINVAL;
    }
    for (uint32_t i = 0; i < nqueues; i++) {
        const struct vpv_lg_queue *lq = &queues[i];
        int ok = 1;
        if (lq->num == 0 || lq->num & (lq->num - 1) || lq->num > 32768 ||
            lq->num < DESC_PER_REQ * cfg->iodepth || lq->used_gpa % 4 || lq->avail_gpa % 2 ||
            lq->desc_gpa % 16 || lq->area_size < vpv_lg_area_size(cfg->iodepth, cfg->bs))
            return -EINVAL;
        host_of(cfg, lq->desc_gpa, 16ull * lq->num, &ok);
        host_of(cfg, lq->avail_gpa, 6 + 2ull * lq->num, &ok);
        host_of(cfg, lq->used_gpa, 6 + 8ull * lq->num, &ok);
        host_of(cfg, lq->area_gpa, lq->area_size, &ok);
        if (!ok)
            return -EFAULT;
    }
    return 0;
}

static int queue_init(struct lg_queue *q, struct lg_run *run, uint32_t index,
                      const struct vpv_lg_queue *lq, struct vpv_lg_result *res)
{
    const struct vpv_lg_config *cfg = run->cfg;
    int ok = 1;
    q->run = run;
    q->cfg = lq;
    q->res = res;
    q->index = index;
    q->num = lq->num;
    q->desc = host_of(cfg, lq->desc_gpa, 16ull * lq->num, &ok);
    q->avail = host_of(cfg, lq->avail_gpa, 6 + 2ull * lq->num, &ok);
    q->used = host_of(cfg, lq->used_gpa, 6 + 8ull * lq->num, &ok);
    uint8_t *area = host_of(cfg, lq->area_gpa, lq->area_size, &ok);
    q->used_event = &q->avail->ring[lq->num];
    q->avail_event = (uint16_t *)&q->used->ring[lq->num];
    q->hdr = (struct blk_req_header *)area;
    q->status = area + area_status_off(cfg->iodepth);
    q->data = area + area_data_off(cfg->iodepth);
    q->hdr_gpa = lq->area_gpa;
    q->status_gpa = lq->area_gpa + area_status_off(cfg->iodepth);
    q->data_gpa = lq->area_gpa + area_data_off(cfg->iodepth);
    q->slots = calloc(cfg->iodepth, sizeof(*q->slots));
    q->free_slots = calloc(cfg->iodepth, sizeof(*q->free_slots));
    if (!q->slots || !q->free_slots)
        return -ENOMEM;
    /* Hand out low slots first (free_slots is a stack). */
    for (uint32_t i = 0; i < cfg->iodepth; i++)
        q->free_slots[i] = cfg->iodepth - 1 - i;
    q->nfree = cfg->iodepth;

    /* Fixed chains: request i is descriptors 3i (header), 3i+1 (data), 3i+2 (status). */
    memset(q->desc, 0, 16ull * lq->num);
    for (uint32_t i = 0; i < cfg->iodepth; i++) {
        struct vring_desc *d = &q->desc[i * DESC_PER_REQ];
        d[0].addr = q->hdr_gpa + (uint64_t)i * sizeof(struct blk_req_header);
        d[0].len = sizeof(struct blk_req_header);
        d[0].flags = VRING_DESC_F_NEXT;
        d[0].next = (uint16_t)(i * DESC_PER_REQ + 1);
        d[1].addr = q->data_gpa + (uint64_t)i * cfg->bs;
        d[1].len = cfg->bs;
        d[1].flags = VRING_DESC_F_NEXT;
        d[1].next = (uint16_t)(i * DESC_PER_REQ + 2);
        d[2].addr = q->status_gpa + i;
        d[2].len = 1;
        d[2].flags = VRING_DESC_F_WRITE;
        d[2].next = 0;
    }
    /* Without verify, write something that is not zeros (a backend could special-case
     * those) and that differs between blocks' slots. */
    if (!(cfg->flags & VPV_LG_F_VERIFY)) {
        uint64_t state = cfg->seed ^ index;
        for (uint64_t off = 0; off + 8 <= (uint64_t)cfg->iodepth * cfg->bs; off += 8) {
            uint64_t w = splitmix64(&state);
            memcpy(q->data + off, &w, 8);
        }
    }
    /* The rings start empty (SET_VRING_BASE 0): avail idx 0, interrupts wanted. */
    q->avail->flags = 0;
    __atomic_store_n(&q->avail->idx, 0, __ATOMIC_RELAXED);
    *q->used_event = 0;
    q->avail_idx = 0;
    q->last_used = __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE);
    if (q->last_used != 0)
        return -EINVAL;  /* the used ring must be fresh */
    q->rng = mix64(cfg->seed + GOLDEN * (index + 1));
    /* Sequential workloads: each queue starts at its own share of the disk. */
    q->seq_next = run->nblocks * index / run->nqueues;
    return 0;
}

int vpv_lg_run(struct vpv_lg_config *cfg, const struct vpv_lg_queue *queues,
               struct vpv_lg_result *results, uint32_t nqueues)
{
    for (uint32_t i = 0; i < nqueues && i < VPV_LG_MAX_QUEUES; i++)
        memset(&results[i], 0, sizeof(results[i]));
    cfg->backend_cpu_ticks = 0;
    cfg->backend_cpu_ok = 0;
    int err = check_config(cfg, queues, nqueues);
    if (err)
        return err;

    struct lg_run run = {
        .cfg = cfg,
        .nblocks = cfg->capacity / cfg->bs,
        .sectors_per_block = cfg->bs / VPV_SECTOR_SIZE,
        .nqueues = nqueues,
    };
    struct lg_queue *qs = calloc(nqueues, sizeof(*qs));
    pthread_t *threads = calloc(nqueues, sizeof(*threads));
    if (!qs || !threads) {
        err = -ENOMEM;
        goto out;
    }
    run.queues = qs;
    if (cfg->flags & VPV_LG_F_VERIFY) {
        run.busy = calloc(run.nblocks, 1);
        if (!run.busy) {
            err = -ENOMEM;
            goto out;
        }
    }
    for (uint32_t i = 0; i < nqueues; i++) {
        err = queue_init(&qs[i], &run, i, &queues[i], &results[i]);
        if (err)
            goto out;
    }
    barrier_init(&run.barrier, nqueues);

    /* Signals (Ctrl-C) belong to the Python thread that set cfg->stop, not to ours. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    uint32_t started = 0;
    for (; started < nqueues; started++) {
        int rc = pthread_create(&threads[started], NULL, queue_thread, &qs[started]);
        if (rc) {
            err = -rc;
            break;
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (started < nqueues) {
        /* The threads that did start stop at once and must not wait for the others. */
        __atomic_store_n(&run.abort, 1, __ATOMIC_RELAXED);
        for (uint32_t i = started; i < nqueues; i++)
            results[i].status = err;
        barrier_set_count(&run.barrier, started);
    }
    for (uint32_t i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
    barrier_destroy(&run.barrier);

    for (uint32_t i = 0; i < nqueues && !err; i++)
        err = results[i].status;
    if (!err && __atomic_load_n(&cfg->stop, __ATOMIC_RELAXED))
        err = -EINTR;
out:
    if (qs) {
        for (uint32_t i = 0; i < nqueues; i++) {
            free(qs[i].slots);
            free(qs[i].free_slots);
        }
    }
    free(qs);
    free(threads);
    free(run.busy);
    return err;
}
