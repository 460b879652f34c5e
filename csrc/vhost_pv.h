/*
 * vhost_pv.h: the one interface between the Python control plane and the C data path.
 *
 * build.py feeds this file to cffi's cdef (lines starting with '#' other than integer
 * #defines are dropped first), so it must stay within what cdef parses: plain structs,
 * opaque structs, integer #defines and prototypes.
 */
#ifndef VHOST_PV_H
#define VHOST_PV_H
#include <stdint.h>

/* Limits the device advertises and the hot path enforces. */
#define VPV_MAX_REGIONS 8
#define VPV_MAX_QUEUES 16
#define VPV_MAX_QUEUE_SIZE 1024
/* Segments per request we advertise (seg_max); one more for the header, one for status. */
#define VPV_SEG_MAX 126
/* Host iovecs one request may use after splitting descriptors at region borders. */
#define VPV_MAX_IOV 1024
#define VPV_MAX_DISCARD_SEGMENTS 16
#define VPV_SECTOR_SIZE 512
#define VPV_SERIAL_BYTES 20

/* Volume state word values (mirrors vhost_pv.volume.header.VolumeState). */
#define VPV_STATE_ATTACHED 1
#define VPV_STATE_DANGLING 2

/* Read policy of a dangling volume (mirrors vhost_pv.volume.header.ReadPolicy). */
#define VPV_READ_DENY 0
#define VPV_READ_ZEROS 1
#define VPV_READ_ALLOW 2
/* Ring-full policy (mirrors vhost_pv.volume.header.RingFullPolicy). */
#define VPV_RING_FULL_REJECT 0
#define VPV_RING_FULL_OVERWRITE 1

/* What a request on a dangling volume came to (vpv_dangling_event.outcome). */
#define VPV_EVENT_QUARANTINED 0   /* write / discard / write-zeroes went to the ring */
#define VPV_EVENT_READ_DENIED 1   /* read refused with IOERR (policy deny) */
#define VPV_EVENT_READ_ZEROS 2    /* read answered with zeros (policy zeros) */
#define VPV_EVENT_READ_ALLOWED 3  /* read served from the data region (policy allow, audited) */
#define VPV_EVENT_RING_FULL 4     /* write refused: ring full under the reject policy */
#define VPV_EVENT_RING_ERROR 5    /* the ring could not be written (I/O error, corrupt) */

/* Flags for vpv_blk_new. */
#define VPV_BLK_READ_ONLY 1
#define VPV_BLK_SYNC_IO 2      /* no io_uring: preadv/pwritev in the worker (as without one) */
/* Requests a queue keeps in flight on its io_uring, and the data segments one of them may
 * have to go there; longer requests are served synchronously. */
#define VPV_ASYNC_SLOTS 128
#define VPV_SLOT_IOV 128

/* One region of the frontend's memory as sent in SET_MEM_TABLE / ADD_MEM_REG. */
struct vpv_mem_region_desc {
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t mmap_offset;
    int fd;
};

/* What the control plane knows of one virtqueue when it starts it. */
struct vpv_vring_config {
    uint32_t num;
    uint16_t base;          /* last_avail_idx to resume from (SET_VRING_BASE) */
    uint16_t event_idx;     /* VIRTIO_RING_F_EVENT_IDX negotiated */
    uint16_t indirect;      /* VIRTIO_RING_F_INDIRECT_DESC negotiated */
    uint64_t desc_user_addr;
    uint64_t avail_user_addr;
    uint64_t used_user_addr;
    int kick_fd;            /* -1: no kick fd, the queue is processed on vpv_blk_queue_process */
    int call_fd;            /* -1: no interrupts */
    /* This queue's region of the inflight area (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, split
     * layout of the vhost-user spec), mapped by the control plane for as long as the queue
     * runs; NULL: requests are not tracked. Frontend memory: validated at queue start. */
    uint8_t *inflight;
    uint64_t inflight_size;
};

/* Counters of one virtqueue, read by `vhost-pv status`. */
struct vpv_queue_stats {
    uint64_t requests;
    uint64_t reads;
    uint64_t writes;
    uint64_t flushes;
    uint64_t discards;
    uint64_t write_zeroes;
    uint64_t get_ids;
    uint64_t unsupported;
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t io_errors;       /* requests completed with VIRTIO_BLK_S_IOERR */
    uint64_t bad_requests;    /* malformed chains or requests (subset of io_errors or no status) */
    uint64_t kicks;
    uint64_t notifications;
    uint64_t quarantined;     /* dangling: writes/discards stored as ring records */
    uint64_t quarantine_refused; /* dangling: writes refused (ring full or failing) */
    uint64_t dangling_denied; /* dangling: reads refused by the deny policy */
    uint64_t watchdog_notifications; /* interrupts re-sent to a driver left waiting */
    uint64_t coalesced_wakes; /* kicks answered after the coalescing wait */
    uint64_t async_ios;       /* data requests served through the io_uring */
    uint64_t polled_wakes;    /* requests found by adaptive polling, without a kick */
    uint64_t direct_fallbacks; /* requests O_DIRECT refused (alignment), served buffered */
    uint16_t last_avail_idx;
    uint16_t running;
    uint16_t broken;          /* the ring was corrupt or its memory vanished; the queue stopped */
    uint16_t _pad;
    uint64_t guest_faults;    /* guest memory vanished under the queue (SIGBUS caught) */
    uint64_t calls_saturated; /* interrupts not sent: the call eventfd was full (one is pending) */
};

/* Where a volume's regions are and how it behaves while dangling. */
struct vpv_volume_config {
    uint64_t data_offset;
    uint64_t capacity;
    uint64_t state_offset;        /* the live state word in the header area */
    uint64_t ring_offset;
    uint64_t ring_size;
    uint32_t read_policy;         /* VPV_READ_* */
    uint32_t ring_full_policy;    /* VPV_RING_FULL_* */
};

/* One I/O attempt on a dangling volume, queued for the volume's guard thread. */
struct vpv_dangling_event {
    uint64_t time_ns;
    uint64_t sector;
    uint64_t seq;                 /* ring record sequence number when quarantined, else 0 */
    uint32_t length;
    uint32_t source;              /* connection id given to vpv_blk_new */
    uint16_t request_type;        /* virtio-blk request type */
    uint16_t queue;
    uint16_t outcome;             /* VPV_EVENT_* */
    uint16_t _pad;
};

/* The quarantine ring's counters (see vpv_ring.h for the layout on disk). */
struct vpv_ring_stats {
    uint64_t area_size;
    uint64_t head;
    uint64_t tail;
    uint64_t next_seq;
    uint64_t records;
    uint64_t dropped;
    uint64_t rejected;
    uint64_t bytes_used;
};

struct vpv_volume;

/* Open the shared per-volume state over an open volume fd: maps the state word read-write
 * and loads the ring superblock (-EBADMSG if it is corrupt). NULL and *err on failure. */
struct vpv_volume *vpv_volume_open(int volume_fd, const struct vpv_volume_config *cfg, int *err);
/* Every vpv_blk on the volume must be freed first. Does not close volume_fd. */
void vpv_volume_close(struct vpv_volume *vol);
/* Publish a new state to the data path. Returns once no request that saw the old state is
 * still running: after it, no write that started before lands in the data region. */
int vpv_volume_set_state(struct vpv_volume *vol, uint32_t state);
uint32_t vpv_volume_state(struct vpv_volume *vol);
int vpv_volume_set_policy(struct vpv_volume *vol, uint32_t read_policy, uint32_t ring_full_policy);
/* Readable (eventfd) when dangling events are queued. */
int vpv_volume_event_fd(struct vpv_volume *vol);
/* Move up to max queued events to out; *lost = events dropped since the last drain. */
int vpv_volume_drain_events(struct vpv_volume *vol, struct vpv_dangling_event *out, uint32_t max,
                            uint64_t *lost);
int vpv_volume_ring_stats(struct vpv_volume *vol, struct vpv_ring_stats *out);
/* Write the ring superblock back if records were added since the last sync. The data path
 * does this at the end of each batch and on FLUSH; readers of the file call it first. */
int vpv_volume_ring_sync(struct vpv_volume *vol);
/* Empty the ring (discard); sequence numbers and the hash chain carry on. */
int vpv_volume_ring_reset(struct vpv_volume *vol);
/* Re-read the superblock after it was changed on disk by someone else. */
int vpv_volume_ring_reload(struct vpv_volume *vol);

/* Make [offset, offset + length) of fd read as zeros, freeing the blocks where the file
 * system can (punch hole, else zero range, else written zeros). 0 or a negative errno. */
int vpv_zero_range(int fd, uint64_t offset, uint64_t length);

struct vpv_blk;

/* Create one frontend connection's block device on a volume. The volume's state word is
 * read on every request; `source` names the connection in ring records and events.
 * Reads and writes of the data region go VPV_ASYNC_SLOTS at a time on an io_uring per
 * queue. direct_fd: -1, or the volume file opened with O_DIRECT (not owned): they then go
 * through it, and fall back to the volume fd for a request the device's alignment refuses.
 * Returns NULL and sets *err to a negative errno. */
struct vpv_blk *vpv_blk_new(struct vpv_volume *vol, uint32_t flags, const uint8_t *serial,
                            uint32_t source, int direct_fd, int *err);
/* Stops every queue, unmaps memory and frees the device. The volume stays open. */
void vpv_blk_free(struct vpv_blk *blk);

/* Replace the memory table (all queues must be stopped). The fds are not kept: the caller
 * closes them. Returns 0 or a negative errno; on error the table is empty. */
int vpv_blk_set_memory(struct vpv_blk *blk, const struct vpv_mem_region_desc *regions,
                       uint32_t count);

/* Start a queue: with a kick fd a worker thread serves it until vpv_blk_queue_stop.
 * Returns 0 or a negative errno (-EFAULT: ring addresses are outside the memory table). */
int vpv_blk_queue_start(struct vpv_blk *blk, uint32_t index, const struct vpv_vring_config *cfg);
/* Stop a queue and wait for its worker; returns last_avail_idx (>= 0) or a negative errno. */
int vpv_blk_queue_stop(struct vpv_blk *blk, uint32_t index);
/* Process what is available on a started queue in the calling thread (no GIL needed).
 * Returns the number of requests completed, or a negative errno if the ring is broken. */
int vpv_blk_queue_process(struct vpv_blk *blk, uint32_t index);
int vpv_blk_queue_stats(struct vpv_blk *blk, uint32_t index, struct vpv_queue_stats *out);
/* Liveness of one queue's worker, for the service manager's watchdog (any thread may read
 * it while the worker runs). Times are CLOCK_MONOTONIC_COARSE: seconds matter here, and
 * reading that clock costs the worker next to nothing per request. */
struct vpv_queue_health {
    uint64_t heartbeats;      /* turns of the worker's loop: it wakes at least once a second */
    uint64_t busy_ns;         /* how long the worker has been inside its current request (or
                               * wake-up); 0 while it sleeps. Seconds: stuck in the kernel */
    uint64_t uring_wait_ns;   /* requests in flight on the io_uring and none completed for
                               * this long; 0 when none is in flight */
    uint64_t storage_wait_ns; /* how long the worker has been inside the storage part of a
                               * request (syscalls on the volume); 0 outside it */
    uint32_t has_worker;      /* a worker thread serves the queue */
    uint32_t _pad;
};
int vpv_blk_queue_health(struct vpv_blk *blk, uint32_t index, struct vpv_queue_health *out);
/* An eventfd (non-blocking, owned by the device) that becomes readable when a queue breaks
 * (corrupt ring, guest memory gone): the control plane then ends the connection. */
int vpv_blk_broken_fd(struct vpv_blk *blk);
/* Requests the queue's inflight region marks in flight (0 without a region), or -errno.
 * After a clean stop (every request drained) this must be 0. */
int vpv_blk_queue_inflight(struct vpv_blk *blk, uint32_t index);

/* -- virtio-fs queues (fs.c): the metadata file system ---------------------------------------
 * The rings are walked by the block device's code; each request is answered in Python
 * (FUSE), one at a time per queue: pop copies its readable bytes out, push copies the reply
 * into its writable buffers and publishes it. Processed in the caller's thread. */
#define VPV_FS_MAX_QUEUES 2     /* the high-priority queue and one request queue */
#define VPV_FS_MAX_REQUEST 1048576 /* readable bytes of one request (FUSE header + write data) */

struct vpv_fs;
struct vpv_fs *vpv_fs_new(void);
void vpv_fs_free(struct vpv_fs *fs);
int vpv_fs_set_memory(struct vpv_fs *fs, const struct vpv_mem_region_desc *regions, uint32_t count);
int vpv_fs_queue_start(struct vpv_fs *fs, uint32_t index, const struct vpv_vring_config *cfg);
/* Returns last_avail_idx, or a negative errno. A request popped but not answered gets back
 * its buffers empty. */
int vpv_fs_queue_stop(struct vpv_fs *fs, uint32_t index);
/* The next request: its readable bytes into buf (at most cap), *head, and how many bytes the
 * reply may have (*writable). Returns the byte count, -EAGAIN (ring empty, kicks re-enabled),
 * -EBADMSG (a chain that cannot be answered was given back empty), -EBUSY (the previous
 * request was not pushed yet) or -EIO (the ring itself is corrupt). -EFAULT: guest memory
 * vanished under the queue (the frontend shrank its memory file); the queue is broken from
 * then on (-EIO), and the connection should end. */
int vpv_fs_pop(struct vpv_fs *fs, uint32_t index, uint8_t *buf, uint32_t cap, uint32_t *head,
               uint32_t *writable);
/* Answer the request popped last on that queue; returns bytes written into its buffers, or
 * -EFAULT (guest memory vanished, as for vpv_fs_pop). */
int vpv_fs_push(struct vpv_fs *fs, uint32_t index, uint32_t head, const uint8_t *reply, uint32_t len);

#endif
