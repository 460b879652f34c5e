/*
 * vring.h: split virtqueue internals shared by vring.c and blk.c. Not part of the cffi
 * interface (that is vhost_pv.h); nothing here is visible to Python.
 */
#ifndef VHOST_PV_VRING_H
#define VHOST_PV_VRING_H

#include <setjmp.h>
#include <stdint.h>
#include <sys/uio.h>

#include "vhost_pv.h"

/* Layouts from the virtio 1.x specification, section "Split Virtqueues". */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];   /* ring[num], then used_event */
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];  /* ring[num], then avail_event */
};

struct vpv_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t uaddr;
    uint8_t *host;        /* start of the region in our address space */
    void *mmap_base;      /* what to munmap */
    uint64_t mmap_size;
};

struct vpv_memory {
    uint32_t count;
    struct vpv_region regions[VPV_MAX_REGIONS];
};

/* One request's buffers after walking its descriptor chain: device-readable iovecs first,
 * then device-writable ones, as the spec requires. */
struct vpv_chain {
    uint16_t head;
    uint32_t n_in;        /* readable (driver -> device) iovecs, iov[0 .. n_in) */
    uint32_t n_out;       /* writable (device -> driver) iovecs, iov[n_in .. n_in+n_out) */
    uint64_t in_bytes;
    uint64_t out_bytes;
    int bad;              /* some buffer lies outside guest memory: fail the request */
    int status_ok;        /* the last descriptor is writable and mapped: status can be set */
    struct iovec iov[VPV_MAX_IOV];
};

/* Inflight I/O tracking, split virtqueue layout (vhost-user spec, "Inflight I/O tracking").
 * One region per queue, in memory shared with the frontend so that it outlives us: a
 * backend restarted after a crash learns from it which requests it had taken and not
 * completed, and takes them again. */
#define VPV_INFLIGHT_VERSION 1

struct vpv_inflight_desc {
    uint8_t inflight;      /* 1 while the request headed by this descriptor is ours */
    uint8_t padding[5];
    uint16_t next;         /* links the last batch of used heads */
    uint64_t counter;      /* order the requests were taken in */
};

struct vpv_inflight_region {
    uint64_t features;
    uint16_t version;      /* 0: never initialised */
    uint16_t desc_num;     /* the queue size */
    uint16_t last_batch_head;
    uint16_t used_idx;     /* used->idx once the last batch is fully recorded */
    struct vpv_inflight_desc desc[];
};

struct vpv_vring {
    uint32_t num;
    int event_idx;
    int indirect;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t last_avail_idx;
    uint16_t used_idx;
    uint16_t signalled_used;     /* used_idx when we last notified (EVENT_IDX) */
    int signalled_valid;
    struct vpv_inflight_region *inflight;  /* NULL: requests are not tracked */
    uint64_t inflight_counter;             /* last counter given to a taken request */
    /* Requests a previous backend took and never completed, oldest first: popped before
     * anything new in the avail ring. */
    uint32_t resubmit_count;
    uint32_t resubmit_pos;
    uint16_t resubmit[VPV_MAX_QUEUE_SIZE];
};

/* Map a region set; returns 0 or -errno. */
int vpv_memory_map(struct vpv_memory *mem, const struct vpv_mem_region_desc *regions,
                   uint32_t count);
void vpv_memory_unmap(struct vpv_memory *mem);
/* Host pointer for [gpa, gpa+len) if it lies inside one region, else NULL. */
void *vpv_gpa_to_host(const struct vpv_memory *mem, uint64_t gpa, uint64_t len);
void *vpv_uaddr_to_host(const struct vpv_memory *mem, uint64_t uaddr, uint64_t len);

/* Resolve ring addresses; returns 0 or -EFAULT/-EINVAL. */
int vpv_vring_init(struct vpv_vring *vr, const struct vpv_memory *mem,
                   const struct vpv_vring_config *cfg);

/* Result of vpv_vring_pop. */
enum vpv_pop {
    VPV_POP_EMPTY = 0,     /* nothing available */
    VPV_POP_OK = 1,        /* chain is valid and filled */
    VPV_POP_BAD_CHAIN = 2, /* the chain is malformed: complete it with an error, go on */
    VPV_POP_BROKEN = 3,    /* the ring itself is corrupt: stop the queue */
};

enum vpv_pop vpv_vring_pop(struct vpv_vring *vr, const struct vpv_memory *mem,
                           struct vpv_chain *chain);
void vpv_vring_push(struct vpv_vring *vr, uint16_t head, uint32_t written);
/* After a batch: should the driver be interrupted? */
int vpv_vring_should_notify(struct vpv_vring *vr);
/* Ask for kicks again (EVENT_IDX: publish avail_event); returns 1 if more work arrived. */
int vpv_vring_enable_kicks(struct vpv_vring *vr);
void vpv_vring_disable_kicks(struct vpv_vring *vr);
/* Has the driver made requests available that were not popped yet (or are requests left
 * to resubmit)? */
int vpv_vring_avail_pending(struct vpv_vring *vr);
/* Heads the inflight region marks in flight (0 without a region). */
uint32_t vpv_vring_inflight_count(const struct vpv_vring *vr);

/* -- guest memory that vanishes under us ------------------------------------------------------
 *
 * Guest memory is a file the frontend owns. If it shrinks that file after SET_MEM_TABLE, our
 * next load or store in the lost range raises SIGBUS, which would kill the whole daemon.
 * The guard turns that into an error for the one queue (or request) that touched it:
 *
 *     sigjmp_buf env;
 *     sigjmp_buf *prev;
 *     if (sigsetjmp(env, 0)) {            // a fault: the guard is already disarmed
 *         vpv_guard_restore(prev);
 *         ... release what is held, fail the queue ...
 *     }
 *     prev = vpv_guard_arm(&env);
 *     ... touch guest memory ...
 *     vpv_guard_restore(prev);
 *
 * (prev must be volatile or set before sigsetjmp if it is read after a fault; the helpers
 * below return the previous value so guards nest.) Arming is a thread-local store, no system
 * call: sigsetjmp(env, 0) does not save the signal mask, and the handler runs with
 * SA_NODEFER, so SIGBUS is never left blocked after the jump. A SIGBUS on a thread with no
 * guard armed behaves as before (the previous disposition, normally a core dump).
 * The kernel side (preadv/pwritev/io_uring into lost memory) fails with EFAULT instead. */
void vpv_guard_install(void);              /* once per process; every device creation calls it */
sigjmp_buf *vpv_guard_arm(sigjmp_buf *env); /* returns the previously armed guard, or NULL */
void vpv_guard_restore(sigjmp_buf *prev);
/* Faults caught since the process started (all threads). */
uint64_t vpv_guard_faults(void);

/* SHA-256 for the quarantine ring (sha256.c). */
struct vpv_sha256 {
    uint32_t h[8];
    uint64_t length;
    uint8_t buf[64];
    size_t fill;
};
void vpv_sha256_init(struct vpv_sha256 *s);
void vpv_sha256_update(struct vpv_sha256 *s, const void *data, size_t len);
void vpv_sha256_final(struct vpv_sha256 *s, uint8_t out[32]);

#endif
