/*
 * vring.c: guest memory and split virtqueues, written for a guest we do not trust.
 *
 * Every address the guest hands us is translated through the memory table with bounds
 * checks; every index is checked against the queue size; chains are bounded so a loop
 * cannot hold the worker. Descriptors are copied out of shared memory before use, so the
 * guest cannot change one between our check and our use of it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "vring.h"

/* -- SIGBUS guard (see vring.h) -------------------------------------------------------------- */

static pthread_once_t guard_once = PTHREAD_ONCE_INIT;
static struct sigaction guard_previous;
static uint64_t guard_fault_count;
/* initial-exec: the handler reads this with one %fs-relative load. The general TLS model of a
 * dlopen'ed library may call __tls_get_addr, which can allocate on a thread's first access
 * and is not async-signal-safe; one pointer fits glibc's static TLS reserve for dlopen. */
static __thread sigjmp_buf *guard_env __attribute__((tls_model("initial-exec")));

static void guard_handler(int sig, siginfo_t *info, void *uctx)
{
    (void)uctx;
    sigjmp_buf *env = guard_env;
    if (env && info->si_code > 0) {   /* a fault on a guarded thread, not a kill(SIGBUS) */
        guard_env = NULL;             /* a second fault before re-arming is a real crash */
        __atomic_fetch_add(&guard_fault_count, 1, __ATOMIC_RELAXED);
        siglongjmp(*env, 1);
    }
    /* Not a guest memory access: behave exactly as without the guard. Put the previous
     * disposition back; returning re-executes the faulting instruction, which now gets it
     * (normally the default: a core dump). A SIGBUS sent by kill() is sent again. */
    sigaction(SIGBUS, &guard_previous, NULL);
    if (info->si_code <= 0)
        raise(sig);
}

static void guard_install_once(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = guard_handler;
    sigemptyset(&sa.sa_mask);
    /* SA_NODEFER: SIGBUS is not added to the mask while the handler runs, so leaving it by
     * siglongjmp to a sigsetjmp(env, 0) (which does not restore the mask, and so costs no
     * system call per arm) leaves SIGBUS unblocked for the next fault. */
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGBUS, &sa, &guard_previous);
}

void vpv_guard_install(void)
{
    pthread_once(&guard_once, guard_install_once);
}

sigjmp_buf *vpv_guard_arm(sigjmp_buf *env)
{
    sigjmp_buf *prev = guard_env;
    /* The jump buffer must be complete before the handler can see it. */
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    guard_env = env;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    return prev;
}

void vpv_guard_restore(sigjmp_buf *prev)
{
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    guard_env = prev;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

uint64_t vpv_guard_faults(void)
{
    return __atomic_load_n(&guard_fault_count, __ATOMIC_RELAXED);
}

int vpv_memory_map(struct vpv_memory *mem, const struct vpv_mem_region_desc *regions,
                   uint32_t count)
{
    vpv_memory_unmap(mem);
    if (count > VPV_MAX_REGIONS)
        return -E2BIG;
    for (uint32_t i = 0; i < count; i++) {
        const struct vpv_mem_region_desc *d = &regions[i];
        uint64_t map_size = d->memory_size + d->mmap_offset;
        if (d->memory_size == 0 || map_size < d->memory_size ||
            d->guest_phys_addr + d->memory_size < d->guest_phys_addr ||
            d->userspace_addr + d->memory_size < d->userspace_addr) {
            vpv_memory_unmap(mem);
            return -EINVAL;
        }
        /* mmap() does not look at the file size: a region reaching past the end of its
         * file maps, and the first access there raises SIGBUS in the worker. */
        struct stat st;
        if (fstat(d->fd, &st) != 0) {
            int err = -errno;
            vpv_memory_unmap(mem);
            return err;
        }
        if (S_ISREG(st.st_mode) && (st.st_size < 0 || (uint64_t)st.st_size < map_size)) {
            vpv_memory_unmap(mem);
            return -EINVAL;
        }
        /* The size checked above is only a snapshot: the frontend can shrink the file later.
         * A memfd sealed with F_SEAL_SHRINK (QEMU's memory-backend-memfd seals by default)
         * cannot shrink, but memory-backend-file on /dev/shm or hugetlbfs cannot be sealed,
         * an unsealed memfd is just as valid, and a hostile frontend does not seal. So every
         * access to guest memory runs under the SIGBUS guard (vpv_guard_arm) whatever the
         * seals say; they would only save a guard nobody pays for (arming is a TLS store). */
        void *base = mmap(NULL, map_size, PROT_READ | PROT_WRITE, MAP_SHARED, d->fd, 0);
        if (base == MAP_FAILED) {
            int err = -errno;
            vpv_memory_unmap(mem);
            return err;
        }
        struct vpv_region *r = &mem->regions[mem->count++];
        r->gpa = d->guest_phys_addr;
        r->size = d->memory_size;
        r->uaddr = d->userspace_addr;
        r->mmap_base = base;
        r->mmap_size = map_size;
        r->host = (uint8_t *)base + d->mmap_offset;
    }
    return 0;
}

void vpv_memory_unmap(struct vpv_memory *mem)
{
    for (uint32_t i = 0; i < mem->count; i++)
        munmap(mem->regions[i].mmap_base, mem->regions[i].mmap_size);
    memset(mem, 0, sizeof(*mem));
}

static const struct vpv_region *find_gpa(const struct vpv_memory *mem, uint64_t gpa)
{
    for (uint32_t i = 0; i < mem->count; i++) {
        const struct vpv_region *r = &mem->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size)
            return r;
    }
    return NULL;
}

void *vpv_gpa_to_host(const struct vpv_memory *mem, uint64_t gpa, uint64_t len)
{
    const struct vpv_region *r = find_gpa(mem, gpa);
    if (!r || len > r->size - (gpa - r->gpa))
        return NULL;
    return r->host + (gpa - r->gpa);
}

void *vpv_uaddr_to_host(const struct vpv_memory *mem, uint64_t uaddr, uint64_t len)
{
    for (uint32_t i = 0; i < mem->count; i++) {
        const struct vpv_region *r = &mem->regions[i];
        if (uaddr >= r->uaddr && uaddr - r->uaddr < r->size &&
            len <= r->size - (uaddr - r->uaddr))
            return r->host + (uaddr - r->uaddr);
    }
    return NULL;
}

/* Order of resubmission: by the counter each request got when it was taken. */
struct inflight_entry {
    uint64_t counter;
    uint16_t head;
};

static int by_counter(const void *a, const void *b)
{
    const struct inflight_entry *x = a, *y = b;
    return x->counter < y->counter ? -1 : x->counter > y->counter;
}

/*
 * Take over a queue's inflight region (vhost-user spec, "Inflight I/O tracking", split
 * layout). The region is frontend memory: every field is checked before it is believed,
 * and nothing is written to it until the whole of it is found consistent.
 *
 * After a crash the frontend (QEMU) restarts the ring with last_avail_idx = used->idx (it
 * cannot know better). Completions are out of order, so the avail entries from that index
 * on are a mix of requests we completed and requests we never did, and some of the latter
 * may lie before it. The region says which heads are still ours: they are taken again
 * first, in the order they were first taken, and the avail ring resumes after them
 * (used->idx + their count), whatever base the frontend sent. Returns 0, or -EBADMSG for a
 * region that cannot be believed.
 */
static int inflight_recover(struct vpv_vring *vr, uint8_t *base, uint64_t size)
{
    uint32_t num = vr->num;
    struct vpv_inflight_region *r = (struct vpv_inflight_region *)base;
    if ((uintptr_t)base & 7 ||
        size < sizeof(*r) + (uint64_t)num * sizeof(struct vpv_inflight_desc))
        return -EBADMSG;
    uint16_t version = __atomic_load_n(&r->version, __ATOMIC_ACQUIRE);
    if (version == 0) {
        /* Never initialised (the spec's meaning of version 0): nothing is in flight. */
        memset(r->desc, 0, (size_t)num * sizeof(r->desc[0]));
        r->features = 0;
        r->desc_num = (uint16_t)num;
        r->last_batch_head = 0;
        r->used_idx = vr->used_idx;
        __atomic_store_n(&r->version, VPV_INFLIGHT_VERSION, __ATOMIC_RELEASE);
        vr->inflight = r;
        return 0;
    }
    if (version != VPV_INFLIGHT_VERSION || r->desc_num != num)
        return -EBADMSG;

    /* A crash while completing a batch: used->idx was published, the flags not cleared. The
     * batch is the list from last_batch_head, as long as the difference of the indices. */
    uint16_t batch = (uint16_t)(vr->used_idx - r->used_idx);
    if (batch > num)
        return -EBADMSG;
    uint8_t in_batch[VPV_MAX_QUEUE_SIZE];
    memset(in_batch, 0, num);
    uint16_t head = r->last_batch_head;
    for (uint16_t i = 0; i < batch; i++) {
        if (head >= num)
            return -EBADMSG;
        in_batch[head] = 1;
        head = r->desc[head].next;
    }

    struct inflight_entry entries[VPV_MAX_QUEUE_SIZE];
    uint32_t count = 0;
    uint64_t max_counter = 0;
    for (uint32_t i = 0; i < num; i++) {
        uint8_t flag = r->desc[i].inflight;
        if (flag > 1)
            return -EBADMSG;
        uint64_t counter = r->desc[i].counter;
        if (counter > max_counter)
            max_counter = counter;
        if (flag && !in_batch[i]) {
            entries[count].counter = counter;
            entries[count].head = (uint16_t)i;
            count++;
        }
    }
    /* Those requests came from the avail ring after the last completed one: the driver must
     * have made at least that many available. */
    uint16_t avail_idx = __atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE);
    if ((uint16_t)(avail_idx - vr->used_idx) < count)
        return -EBADMSG;

    /* Consistent: commit the interrupted batch, then resume. */
    for (uint32_t i = 0; i < num; i++)
        if (in_batch[i])
            __atomic_store_n(&r->desc[i].inflight, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&r->used_idx, vr->used_idx, __ATOMIC_RELEASE);
    qsort(entries, count, sizeof(entries[0]), by_counter);
    for (uint32_t i = 0; i < count; i++)
        vr->resubmit[i] = entries[i].head;
    vr->resubmit_count = count;
    vr->resubmit_pos = 0;
    vr->inflight_counter = max_counter;
    vr->last_avail_idx = (uint16_t)(vr->used_idx + count);
    vr->inflight = r;
    return 0;
}

uint32_t vpv_vring_inflight_count(const struct vpv_vring *vr)
{
    if (!vr->inflight)
        return 0;
    uint32_t count = 0;
    for (uint32_t i = 0; i < vr->num; i++)
        count += __atomic_load_n(&vr->inflight->desc[i].inflight, __ATOMIC_RELAXED) != 0;
    return count;
}

int vpv_vring_init(struct vpv_vring *vr, const struct vpv_memory *mem,
                   const struct vpv_vring_config *cfg)
{
    memset(vr, 0, sizeof(*vr));
    /* The split ring needs a power-of-two size for its free-running indices. */
    if (cfg->num == 0 || cfg->num > VPV_MAX_QUEUE_SIZE || (cfg->num & (cfg->num - 1)))
        return -EINVAL;
    uint64_t desc_len = 16ull * cfg->num;
    uint64_t avail_len = 6 + 2ull * cfg->num;
    uint64_t used_len = 6 + 8ull * cfg->num;
    vr->desc = vpv_uaddr_to_host(mem, cfg->desc_user_addr, desc_len);
    vr->avail = vpv_uaddr_to_host(mem, cfg->avail_user_addr, avail_len);
    vr->used = vpv_uaddr_to_host(mem, cfg->used_user_addr, used_len);
    if (!vr->desc || !vr->avail || !vr->used)
        return -EFAULT;
    /* Alignment the spec guarantees; a frontend breaking it would give torn accesses. */
    if (((uintptr_t)vr->desc & 15) || ((uintptr_t)vr->avail & 1) || ((uintptr_t)vr->used & 3))
        return -EINVAL;
    vr->num = cfg->num;
    vr->event_idx = cfg->event_idx;
    vr->indirect = cfg->indirect;
    vr->last_avail_idx = cfg->base;
    /* Resume where the used ring is; on a fresh ring both are zero. This is the first touch
     * of the rings, on the control plane's thread: memory that vanished since SET_MEM_TABLE
     * refuses the start instead of killing the process. */
    sigjmp_buf env;
    sigjmp_buf *prev = vpv_guard_arm(NULL);   /* set before sigsetjmp: valid after a jump */
    if (sigsetjmp(env, 0)) {
        vpv_guard_restore(prev);
        memset(vr, 0, sizeof(*vr));
        return -EFAULT;
    }
    vpv_guard_arm(&env);
    vr->used_idx = __atomic_load_n(&vr->used->idx, __ATOMIC_ACQUIRE);
    (void)__atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE);
    (void)__atomic_load_n(&vr->desc[0].flags, __ATOMIC_RELAXED);
    /* Recovery reads the avail ring too: still under the guard. */
    int rc = cfg->inflight ? inflight_recover(vr, cfg->inflight, cfg->inflight_size) : 0;
    vpv_guard_restore(prev);
    vr->signalled_valid = 0;
    return rc;
}

/* Append [gpa, gpa+len) as one or more iovecs (split at region borders). */
static int add_buffer(struct vpv_chain *chain, const struct vpv_memory *mem, uint64_t gpa,
                      uint32_t len, int writable)
{
    uint64_t remaining = len;
    if (gpa + remaining < gpa)
        return -EFAULT;
    while (remaining > 0) {
        const struct vpv_region *r = find_gpa(mem, gpa);
        if (!r)
            return -EFAULT;
        uint64_t off = gpa - r->gpa;
        uint64_t chunk = r->size - off;
        if (chunk > remaining)
            chunk = remaining;
        uint32_t slot = chain->n_in + chain->n_out;
        if (slot >= VPV_MAX_IOV)
            return -E2BIG;
        chain->iov[slot].iov_base = r->host + off;
        chain->iov[slot].iov_len = chunk;
        if (writable) {
            chain->n_out++;
            chain->out_bytes += chunk;
        } else {
            chain->n_in++;
            chain->in_bytes += chunk;
        }
        gpa += chunk;
        remaining -= chunk;
    }
    return 0;
}

enum vpv_pop vpv_vring_pop(struct vpv_vring *vr, const struct vpv_memory *mem,
                           struct vpv_chain *chain)
{
    uint16_t head;
    if (vr->resubmit_pos < vr->resubmit_count) {
        /* Taken before a restart and never completed: its avail slot is already behind
         * last_avail_idx (see inflight_recover); its chain is walked again from the table. */
        head = vr->resubmit[vr->resubmit_pos++];
    } else {
        uint16_t avail_idx = __atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE);
        uint16_t pending = (uint16_t)(avail_idx - vr->last_avail_idx);
        if (pending == 0)
            return VPV_POP_EMPTY;
        if (pending > vr->num)
            return VPV_POP_BROKEN;   /* the driver claims more entries than the ring holds */
        head = __atomic_load_n(&vr->avail->ring[vr->last_avail_idx % vr->num], __ATOMIC_RELAXED);
        if (head >= vr->num)
            return VPV_POP_BROKEN;   /* nothing we could ever complete */
        vr->last_avail_idx++;
    }
    if (vr->inflight) {
        /* Recorded before any work on it: from here on a crash leaves it for resubmission,
         * until push records its completion. */
        struct vpv_inflight_desc *d = &vr->inflight->desc[head];
        __atomic_store_n(&d->counter, ++vr->inflight_counter, __ATOMIC_RELAXED);
        __atomic_store_n(&d->inflight, 1, __ATOMIC_RELEASE);
    }

    chain->head = head;
    chain->n_in = chain->n_out = 0;
    chain->in_bytes = chain->out_bytes = 0;
    chain->bad = 0;
    chain->status_ok = 0;

    const struct vring_desc *table = vr->desc;
    uint32_t table_len = vr->num;
    uint32_t idx = head;
    uint32_t seen = 0;
    int in_indirect = 0;
    for (;;) {
        if (idx >= table_len || ++seen > table_len)
            return VPV_POP_BAD_CHAIN;   /* index out of range, or a loop */
        struct vring_desc d;
        memcpy(&d, &table[idx], sizeof(d));
        if (d.flags & VRING_DESC_F_INDIRECT) {
            if (!vr->indirect || in_indirect || (d.flags & VRING_DESC_F_NEXT) ||
                d.len == 0 || d.len % sizeof(struct vring_desc) ||
                d.len / sizeof(struct vring_desc) > VPV_MAX_QUEUE_SIZE)
                return VPV_POP_BAD_CHAIN;
            table = vpv_gpa_to_host(mem, d.addr, d.len);
            if (!table)
                return VPV_POP_BAD_CHAIN;
            table_len = d.len / sizeof(struct vring_desc);
            idx = 0;
            seen = 0;
            in_indirect = 1;
            continue;
        }
        int writable = (d.flags & VRING_DESC_F_WRITE) != 0;
        if (!writable && chain->n_out > 0)
            return VPV_POP_BAD_CHAIN;   /* readable after writable breaks the framing */
        int err = add_buffer(chain, mem, d.addr, d.len, writable);
        if (err == -E2BIG)
            return VPV_POP_BAD_CHAIN;
        if (err) {
            /* Keep walking: the status descriptor may still be usable for an IOERR. */
            chain->bad = 1;
            chain->status_ok = 0;
        } else {
            chain->status_ok = writable && d.len > 0;
        }
        if (!(d.flags & VRING_DESC_F_NEXT))
            break;
        idx = d.next;
    }
    return VPV_POP_OK;
}

void vpv_vring_push(struct vpv_vring *vr, uint16_t head, uint32_t written)
{
    /* Inflight tracking, a batch of one (spec order): last_batch_head names the head before
     * used->idx moves, its flag is cleared after, and used_idx in the region follows last.
     * A crash before the used->idx store leaves the request in flight (resubmitted); after
     * it, the region's used_idx lags used->idx and recovery clears last_batch_head's flag. */
    struct vpv_inflight_region *r = head < vr->num ? vr->inflight : NULL;
    if (r) {
        __atomic_store_n(&r->desc[head].next, r->last_batch_head, __ATOMIC_RELAXED);
        __atomic_store_n(&r->last_batch_head, head, __ATOMIC_RELEASE);
    }
    struct vring_used_elem *e = &vr->used->ring[vr->used_idx % vr->num];
    e->id = head;
    e->len = written;
    vr->used_idx++;
    /* The element must be visible before the index that publishes it. */
    __atomic_store_n(&vr->used->idx, vr->used_idx, __ATOMIC_RELEASE);
    if (r) {
        __atomic_store_n(&r->desc[head].inflight, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&r->used_idx, vr->used_idx, __ATOMIC_RELEASE);
    }
}

int vpv_vring_should_notify(struct vpv_vring *vr)
{
    /* Our used->idx store must be ordered before we read the driver's suppression state. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!vr->event_idx)
        return !(__atomic_load_n(&vr->avail->flags, __ATOMIC_RELAXED) &
                 VRING_AVAIL_F_NO_INTERRUPT);
    uint16_t used_event = __atomic_load_n(&vr->avail->ring[vr->num], __ATOMIC_RELAXED);
    uint16_t new_idx = vr->used_idx;
    uint16_t old_idx = vr->signalled_used;
    int valid = vr->signalled_valid;
    vr->signalled_used = new_idx;
    vr->signalled_valid = 1;
    if (!valid)
        return 1;
    /* vring_need_event(): notify if used_event lies in (old_idx, new_idx]. */
    return (uint16_t)(new_idx - used_event - 1) < (uint16_t)(new_idx - old_idx);
}

int vpv_vring_enable_kicks(struct vpv_vring *vr)
{
    if (vr->event_idx) {
        uint16_t *avail_event = (uint16_t *)&vr->used->ring[vr->num];
        __atomic_store_n(avail_event, vr->last_avail_idx, __ATOMIC_RELAXED);
    } else {
        uint16_t flags = __atomic_load_n(&vr->used->flags, __ATOMIC_RELAXED);
        __atomic_store_n(&vr->used->flags, (uint16_t)(flags & ~VRING_USED_F_NO_NOTIFY),
                         __ATOMIC_RELAXED);
    }
    /* Publish the request for kicks before re-reading avail->idx, or a kick is lost. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return vr->resubmit_pos < vr->resubmit_count ||
           __atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE) != vr->last_avail_idx;
}

int vpv_vring_avail_pending(struct vpv_vring *vr)
{
    return vr->resubmit_pos < vr->resubmit_count ||
           __atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE) != vr->last_avail_idx;
}

void vpv_vring_disable_kicks(struct vpv_vring *vr)
{
    if (!vr->event_idx) {
        uint16_t flags = __atomic_load_n(&vr->used->flags, __ATOMIC_RELAXED);
        __atomic_store_n(&vr->used->flags, (uint16_t)(flags | VRING_USED_F_NO_NOTIFY),
                         __ATOMIC_RELAXED);
    }
}
