/*
 * loadgen.h: the interface between vhost_pv_tools.loadgen and csrc/loadgen.c, the data path of
 * the load generator (a vhost-user-blk *frontend*). A tool, not the product: build.py compiles
 * it into its own cffi module (vhost_pv_tools.loadgen._loadgen_native), so the daemon's module
 * carries none of it.
 *
 * build.py feeds this file to cffi's cdef like vhost_pv.h (lines starting with '#' other than
 * integer #defines are dropped), so it must stay within what cdef parses.
 */
#ifndef VHOST_PV_LOADGEN_H
#define VHOST_PV_LOADGEN_H
#include <stdint.h>

/* Queues one run may drive; the CLI's --queues range. */
#define VPV_LG_MAX_QUEUES 16

/* -- The data path of a vhost-user-blk *frontend* ------------------------------------------
 * vhost_pv_tools.loadgen does the vhost-user handshake and lays out each queue's rings and request
 * area in its memfd "guest memory"; vpv_lg_run then starts one thread per queue, each keeping
 * iodepth requests in flight, and joins them all before it returns. Addresses below are guest
 * physical addresses (what descriptors carry): host address = mem_host + (gpa - mem_gpa). */

/* vpv_lg_config.rw */
#define VPV_LG_RANDREAD 0
#define VPV_LG_RANDWRITE 1
#define VPV_LG_READ 2
#define VPV_LG_WRITE 3
#define VPV_LG_RANDRW 4
/* vpv_lg_config.flags */
#define VPV_LG_F_EVENT_IDX 1   /* VIRTIO_RING_F_EVENT_IDX was negotiated */
#define VPV_LG_F_VERIFY 2      /* write patterns, check every read of a block with a generation */
#define VPV_LG_F_PREFILL 4     /* verify: before the timed phase, write every block of generation 0 */
#define VPV_LG_F_CHECK 8       /* verify: after the timed phase, read back every block with one */
/* Latency histogram over nanoseconds: values below 128 exactly, then 64 sub-buckets per
 * power of two (under 1.6 % wide) up to 2^38 ns (~275 s); larger values land in the last. */
#define VPV_LG_HIST_SUB_BITS 6
#define VPV_LG_HIST_BUCKETS 2112
#define VPV_LG_MAX_BAD 8       /* mismatching sectors remembered per queue */
#define VPV_LG_MAX_IODEPTH 256 /* 3 descriptors per request: ring size up to 1024 */

/* One queue as the caller set it up in the backend (SET_VRING_*). */
struct vpv_lg_queue {
    uint64_t desc_gpa;        /* descriptor table, 16 * num bytes */
    uint64_t avail_gpa;       /* available ring, 6 + 2 * num bytes (used_event last) */
    uint64_t used_gpa;        /* used ring, 4096-aligned, 6 + 8 * num bytes (avail_event last) */
    uint64_t area_gpa;        /* request headers, status bytes and data buffers of this queue */
    uint64_t area_size;       /* bytes reserved there: at least vpv_lg_area_size() */
    uint32_t num;             /* ring size: a power of two, at least 3 * iodepth */
    int kick_fd;              /* eventfd given in SET_VRING_KICK: written to notify the device */
    int call_fd;              /* eventfd given in SET_VRING_CALL (non-blocking): polled */
    uint32_t _pad;            /* zero */
};

/* The workload, shared by every queue. */
struct vpv_lg_config {
    uint64_t mem_host;        /* where the guest memory is mapped in this process */
    uint64_t mem_gpa;         /* its guest physical address */
    uint64_t mem_size;        /* its size in bytes */
    uint64_t capacity;        /* bytes of the disk the workload covers, from offset 0 */
    uint64_t runtime_ns;      /* length of the timed phase */
    uint64_t seed;            /* random offsets; with verify also the data pattern */
    uint32_t *generations;    /* verify: capacity / bs entries, 0 = unknown; updated in place */
    uint32_t rw;              /* VPV_LG_RANDREAD .. VPV_LG_RANDRW */
    uint32_t bs;              /* bytes per request, a multiple of 512 */
    uint32_t iodepth;         /* requests in flight per queue, 1 .. VPV_LG_MAX_IODEPTH */
    uint32_t rwmix_read;      /* randrw: percent of requests that read */
    uint32_t flags;           /* VPV_LG_F_* */
    uint32_t timeout_ms;      /* no completion for this long with requests in flight: -ETIMEDOUT */
    int32_t backend_pid;      /* > 0: sample its CPU time around the timed phase */
    uint32_t stop;            /* set to 1 (by another thread) to end the run early */
    uint64_t backend_cpu_ticks; /* out: backend utime + stime during the timed phase, clock ticks */
    int32_t backend_cpu_ok;   /* out: 1 if backend_cpu_ticks was measured */
    uint32_t _pad;            /* zero */
};

/* What one queue did. */
struct vpv_lg_result {
    uint64_t ios;             /* requests completed in the timed phase */
    uint64_t bytes;           /* their data bytes */
    uint64_t reads;           /* of which reads */
    uint64_t writes;          /* of which writes */
    uint64_t errors;          /* requests completed with a status other than OK (every phase) */
    uint64_t mismatches;      /* verified reads whose data was not the expected pattern */
    uint64_t verified;        /* reads checked against a pattern (every phase) */
    uint64_t prefill_ios;     /* writes of the prefill phase */
    uint64_t check_ios;       /* reads of the check phase */
    uint64_t kicks;           /* kick eventfd writes */
    uint64_t waits;           /* poll() calls on the call eventfd */
    uint64_t elapsed_ns;      /* timed phase: start to last completion */
    uint64_t cpu_ns;          /* this queue's thread CPU time in the timed phase */
    uint64_t lat_sum_ns;      /* sum of the timed phase's latencies */
    uint64_t lat_max_ns;      /* largest of them */
    uint64_t bad_sectors[VPV_LG_MAX_BAD]; /* first sectors found not holding their pattern */
    uint32_t nbad;            /* entries of bad_sectors used */
    int32_t status;           /* 0, or the negative errno that stopped this queue */
    uint64_t hist[VPV_LG_HIST_BUCKETS]; /* latency of every timed request, see VPV_LG_HIST_* */
};

/* Bytes of guest memory one queue's request area needs. */
uint64_t vpv_lg_area_size(uint32_t iodepth, uint32_t bs);
/* Histogram bucket of a latency in ns, and the middle of a bucket in ns. */
uint32_t vpv_lg_hist_bucket(uint64_t ns);
double vpv_lg_hist_value(uint32_t bucket);
/* The verify pattern of one block at one generation (len: bs, a multiple of 8). */
void vpv_lg_pattern(uint64_t seed, uint64_t block, uint32_t generation, uint8_t *buf, uint32_t len);
/* Run the workload on nqueues queues; results[i] for queues[i]. Blocks until done: every
 * thread is started and joined inside. 0, -EINVAL (bad config), -ETIMEDOUT (a queue got no
 * completion for timeout_ms), -EPROTO (the device returned a bad used entry), -EINTR (stop),
 * or another negative errno. Results are filled in every case. */
int vpv_lg_run(struct vpv_lg_config *cfg, const struct vpv_lg_queue *queues,
               struct vpv_lg_result *results, uint32_t nqueues);

#endif
