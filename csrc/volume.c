/*
 * volume.c: what every connection to one volume shares: the volume fd, the live state word,
 * the flip lock, the quarantine ring and the queue of dangling-I/O events.
 *
 * The flip lock is a writer-preferring rwlock. Queue workers hold it for reading around
 * each round of requests (state check + I/O, or submission to an io_uring);
 * vpv_volume_set_state takes it for writing and then waits until no data write submitted
 * before is still in flight, so when the flip returns no request that saw the old state is
 * still running, and every later request sees the new one. The control plane has made the
 * new state durable in the header before it calls the flip.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "volume.h"

#define EVENT_QUEUE_LEN 128

static uint32_t crc32_zlib(const uint8_t *data, size_t len)
{
    /* Bitwise CRC-32 (polynomial 0xEDB88320, as zlib): only the 120-byte superblock. */
    uint32_t crc = 0xffffffffu;
    for (size_t i = 0; i < len; i++) {
        crc ^= data[i];
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

uint64_t vpv_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int pwrite_full(int fd, const void *buf, size_t len, off_t off)
{
    const uint8_t *p = buf;
    while (len > 0) {
        ssize_t r = pwrite(fd, p, len, off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += r;
        len -= (size_t)r;
        off += r;
    }
    return 0;
}

static int pread_full(int fd, void *buf, size_t len, off_t off)
{
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t r = pread(fd, p, len, off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        p += r;
        len -= (size_t)r;
        off += r;
    }
    return 0;
}

static int load_super(struct vpv_volume *vol)
{
    struct vpv_ring_super *sb = &vol->super;
    int err = pread_full(vol->fd, sb, sizeof(*sb), (off_t)vol->cfg.ring_offset);
    if (err)
        return err;
    if (memcmp(sb->magic, VPV_RING_MAGIC, 8) || sb->version != VPV_RING_VERSION ||
        sb->crc32 != crc32_zlib((const uint8_t *)sb, offsetof(struct vpv_ring_super, crc32)))
        return -EBADMSG;
    if (sb->align != VPV_RING_ALIGN || sb->area_offset != VPV_RING_SUPER_SIZE ||
        sb->area_size % VPV_RING_ALIGN || sb->area_size == 0 ||
        sb->area_offset + sb->area_size > vol->cfg.ring_size || sb->head > sb->tail ||
        sb->tail - sb->head > sb->area_size || sb->head % VPV_RING_ALIGN ||
        sb->tail % VPV_RING_ALIGN)
        return -EBADMSG;
    return 0;
}

static int store_super(struct vpv_volume *vol)
{
    struct vpv_ring_super *sb = &vol->super;
    sb->crc32 = crc32_zlib((const uint8_t *)sb, offsetof(struct vpv_ring_super, crc32));
    return pwrite_full(vol->fd, sb, sizeof(*sb), (off_t)vol->cfg.ring_offset);
}

struct vpv_volume *vpv_volume_open(int fd, const struct vpv_volume_config *cfg, int *err)
{
    long page = sysconf(_SC_PAGESIZE);
    uint64_t map_off = cfg->state_offset & ~((uint64_t)page - 1);
    if (cfg->state_offset % sizeof(uint32_t) || cfg->state_offset - map_off + 4 > (uint64_t)page ||
        cfg->read_policy > VPV_READ_ALLOW || cfg->ring_full_policy > VPV_RING_FULL_OVERWRITE) {
        *err = -EINVAL;
        return NULL;
    }
    struct vpv_volume *vol = calloc(1, sizeof(*vol));
    if (!vol) {
        *err = -ENOMEM;
        return NULL;
    }
    vol->fd = fd;
    vol->cfg = *cfg;
    vol->event_fd = -1;
    vol->state_map_len = (size_t)page;
    vol->state_map = mmap(NULL, vol->state_map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                          (off_t)map_off);
    if (vol->state_map == MAP_FAILED) {
        *err = -errno;
        free(vol);
        return NULL;
    }
    vol->state = (uint32_t *)((uint8_t *)vol->state_map + (cfg->state_offset - map_off));
    int e = cfg->ring_size ? load_super(vol) : -EINVAL;
    if (e == 0) {
        vol->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (vol->event_fd < 0)
            e = -errno;
    }
    if (e == 0) {
        vol->events = calloc(EVENT_QUEUE_LEN, sizeof(*vol->events));
        if (!vol->events)
            e = -ENOMEM;
    }
    if (e) {
        if (vol->event_fd >= 0)
            close(vol->event_fd);
        munmap(vol->state_map, vol->state_map_len);
        free(vol);
        *err = e;
        return NULL;
    }
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    /* A stream of readers (queue workers) must not starve the flip. */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&vol->flip_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    pthread_mutex_init(&vol->ring_lock, NULL);
    pthread_mutex_init(&vol->event_lock, NULL);
    *err = 0;
    return vol;
}

void vpv_volume_close(struct vpv_volume *vol)
{
    if (!vol)
        return;
    vpv_volume_ring_sync(vol);
    /* A worker stuck on this volume's file (blk.c, STOP_GIVE_UP_MS) may still finish its
     * round under the flip lock and touch the ring: leak the volume rather than free it
     * under the worker (the daemon is shutting down or dropping the volume). */
    if (__atomic_load_n(&vol->abandoned_workers, __ATOMIC_ACQUIRE) != 0)
        return;
    pthread_rwlock_destroy(&vol->flip_lock);
    pthread_mutex_destroy(&vol->ring_lock);
    pthread_mutex_destroy(&vol->event_lock);
    close(vol->event_fd);
    munmap(vol->state_map, vol->state_map_len);
    free(vol->bounce);
    free(vol->events);
    free(vol);
}

int vpv_volume_set_state(struct vpv_volume *vol, uint32_t state)
{
    if (state != VPV_STATE_ATTACHED && state != VPV_STATE_DANGLING)
        return -EINVAL;
    pthread_rwlock_wrlock(&vol->flip_lock);
    __atomic_store_n(vol->state, state, __ATOMIC_RELEASE);
    pthread_rwlock_unlock(&vol->flip_lock);
    /* Writes on io_urings were submitted under the old state; no new ones start now (the
     * state is checked inside the lock). A device write takes well under a second. */
    while (__atomic_load_n(&vol->inflight_writes, __ATOMIC_SEQ_CST) != 0) {
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

uint32_t vpv_volume_state(struct vpv_volume *vol)
{
    return __atomic_load_n(vol->state, __ATOMIC_ACQUIRE);
}

int vpv_volume_set_policy(struct vpv_volume *vol, uint32_t read_policy, uint32_t ring_full_policy)
{
    if (read_policy > VPV_READ_ALLOW || ring_full_policy > VPV_RING_FULL_OVERWRITE)
        return -EINVAL;
    pthread_rwlock_wrlock(&vol->flip_lock);
    vol->cfg.read_policy = read_policy;
    vol->cfg.ring_full_policy = ring_full_policy;
    pthread_rwlock_unlock(&vol->flip_lock);
    return 0;
}

void vpv_volume_begin_request(struct vpv_volume *vol)
{
    pthread_rwlock_rdlock(&vol->flip_lock);
}

void vpv_volume_end_request(struct vpv_volume *vol)
{
    pthread_rwlock_unlock(&vol->flip_lock);
}

/* -- events --------------------------------------------------------------------------------- */

int vpv_volume_event_fd(struct vpv_volume *vol)
{
    return vol->event_fd;
}

void vpv_volume_post_event(struct vpv_volume *vol, const struct vpv_dangling_event *ev)
{
    pthread_mutex_lock(&vol->event_lock);
    int wake = vol->event_count == 0;
    if (vol->event_count == EVENT_QUEUE_LEN) {
        /* The guard is behind: count, never block the data path. Alerts are rate-limited
         * anyway; the counters in the stats say how many attempts there were. */
        vol->events_lost++;
    } else {
        vol->events[(vol->event_first + vol->event_count) % EVENT_QUEUE_LEN] = *ev;
        vol->event_count++;
    }
    pthread_mutex_unlock(&vol->event_lock);
    if (wake) {
        /* Only the first event of a batch wakes the guard; it drains the rest with it. */
        uint64_t one = 1;
        if (write(vol->event_fd, &one, sizeof(one)) < 0) {
            /* EAGAIN: the counter is saturated, the guard will wake anyway. */
        }
    }
}

int vpv_volume_drain_events(struct vpv_volume *vol, struct vpv_dangling_event *out, uint32_t max,
                            uint64_t *lost)
{
    uint64_t counter;
    if (read(vol->event_fd, &counter, sizeof(counter)) < 0) {
        /* EAGAIN: nothing signalled since the last drain. */
    }
    pthread_mutex_lock(&vol->event_lock);
    uint32_t n = vol->event_count < max ? vol->event_count : max;
    for (uint32_t i = 0; i < n; i++)
        out[i] = vol->events[(vol->event_first + i) % EVENT_QUEUE_LEN];
    vol->event_first = (vol->event_first + n) % EVENT_QUEUE_LEN;
    vol->event_count -= n;
    *lost = vol->events_lost;
    vol->events_lost = 0;
    pthread_mutex_unlock(&vol->event_lock);
    return (int)n;
}

/* -- quarantine ring ------------------------------------------------------------------------- */

static off_t area_phys(const struct vpv_volume *vol, uint64_t pos)
{
    return (off_t)(vol->cfg.ring_offset + vol->super.area_offset + pos % vol->super.area_size);
}

/* Drop the oldest record (overwrite policy). Caller holds ring_lock. */
static int drop_oldest(struct vpv_volume *vol)
{
    struct vpv_ring_super *sb = &vol->super;
    struct vpv_ring_record rec;
    int err = pread_full(vol->fd, &rec, sizeof(rec), area_phys(vol, sb->head));
    if (err)
        return err;
    uint64_t room = sb->area_size - sb->head % sb->area_size;
    if (rec.magic != VPV_RECORD_MAGIC || rec.total_len < VPV_RECORD_HEADER_SIZE ||
        rec.total_len % VPV_RING_ALIGN || rec.total_len > room ||
        rec.total_len > sb->tail - sb->head)
        return -EBADMSG;   /* the ring on disk is corrupt: refuse rather than guess */
    if (rec.type != VPV_RECORD_PAD) {
        sb->records--;
        sb->dropped++;
    }
    sb->head += rec.total_len;
    return 0;
}

/* -ENOSPC from ring_append means the ring is full (its reject policy); the file system
 * being out of space (or quota) under the ring is an I/O error of the ring instead, so the
 * caller reports a ring error, not a full ring that a bigger ring would cure. */
static int file_error(int err)
{
    return err == -ENOSPC || err == -EDQUOT ? -EIO : err;
}

int vpv_volume_ring_append(struct vpv_volume *vol, uint16_t type, uint16_t queue, uint32_t source,
                           uint64_t sector, uint32_t length, const struct iovec *iov, uint32_t n,
                           size_t payload_len, uint64_t *seq_out)
{
    struct vpv_ring_super *sb = &vol->super;
    uint64_t padded = (payload_len + VPV_RING_ALIGN - 1) / VPV_RING_ALIGN * VPV_RING_ALIGN;
    uint64_t need = VPV_RECORD_HEADER_SIZE + padded;
    int err = 0;

    pthread_mutex_lock(&vol->ring_lock);
    if (need > sb->area_size) {
        sb->rejected++;
        err = -E2BIG;
        goto out_store;
    }
    /* Copy the payload out of guest memory first: the guest may change its buffer while we
     * hash and write, and the digest must describe exactly the bytes stored. */
    if (vol->bounce_size < need) {
        uint8_t *b = realloc(vol->bounce, need);
        if (!b) {
            err = -ENOMEM;
            goto out;
        }
        vol->bounce = b;
        vol->bounce_size = need;
    }
    uint8_t *payload = vol->bounce + VPV_RECORD_HEADER_SIZE;
    size_t done = 0;
    for (uint32_t i = 0; i < n && done < payload_len; i++) {
        size_t chunk = iov[i].iov_len < payload_len - done ? iov[i].iov_len : payload_len - done;
        memcpy(payload + done, iov[i].iov_base, chunk);
        done += chunk;
    }
    memset(payload + payload_len, 0, padded - payload_len);

    for (;;) {
        uint64_t phys = sb->tail % sb->area_size;
        uint64_t pad = phys + need > sb->area_size ? sb->area_size - phys : 0;
        if (pad && sb->head == sb->tail) {
            /* Empty ring: start over at the beginning of the area, nothing to pad. */
            sb->tail += pad;
            sb->head = sb->tail;
            pad = 0;
        }
        if (sb->tail + pad + need - sb->head <= sb->area_size) {
            if (pad) {
                struct vpv_ring_record filler = {.magic = VPV_RECORD_MAGIC,
                                                 .type = VPV_RECORD_PAD,
                                                 .total_len = (uint32_t)pad};
                err = file_error(pwrite_full(vol->fd, &filler, sizeof(filler),
                                             area_phys(vol, sb->tail)));
                if (err)
                    goto out;
                sb->tail += pad;
            }
            break;
        }
        if (vol->cfg.ring_full_policy != VPV_RING_FULL_OVERWRITE) {
            sb->rejected++;
            err = -ENOSPC;
            goto out_store;
        }
        err = drop_oldest(vol);
        if (err)
            goto out;
    }

    struct vpv_ring_record *rec = (struct vpv_ring_record *)vol->bounce;
    memset(rec, 0, VPV_RECORD_HEADER_SIZE);
    rec->magic = VPV_RECORD_MAGIC;
    rec->type = type;
    rec->queue = queue;
    rec->seq = sb->next_seq;
    rec->time_ns = vpv_now_ns();
    rec->sector = sector;
    rec->length = length;
    rec->payload_len = (uint32_t)payload_len;
    rec->source = source;
    rec->total_len = (uint32_t)need;
    struct vpv_sha256 h;
    vpv_sha256_init(&h);
    vpv_sha256_update(&h, payload, payload_len);
    vpv_sha256_final(&h, rec->payload_sha256);
    memcpy(rec->prev_hash, sb->last_hash, 32);
    vpv_sha256_init(&h);
    vpv_sha256_update(&h, rec, offsetof(struct vpv_ring_record, record_hash));
    vpv_sha256_final(&h, rec->record_hash);

    /* Record first, superblock after: a crash in between leaves the old ring intact. */
    err = file_error(pwrite_full(vol->fd, vol->bounce, need, area_phys(vol, sb->tail)));
    if (err)
        goto out;
    memcpy(sb->last_hash, rec->record_hash, 32);
    if (seq_out)
        *seq_out = sb->next_seq;
    sb->next_seq++;
    sb->records++;
    sb->tail += need;
out_store:
    /* The superblock goes to the file (page cache) once per round of the worker, before
     * any request of the round is acknowledged (blk.c publish_deferred), and is made durable
     * at a FLUSH (fdatasync), not per record: a kill -9 loses no acknowledged record, a power
     * loss only records the guest had not flushed, as with writes to the data region. */
    vol->super_dirty = 1;
out:
    pthread_mutex_unlock(&vol->ring_lock);
    return err;
}

int vpv_volume_ring_sync(struct vpv_volume *vol)
{
    int err = 0;
    pthread_mutex_lock(&vol->ring_lock);
    if (vol->super_dirty) {
        err = store_super(vol);
        if (!err)
            vol->super_dirty = 0;
    }
    pthread_mutex_unlock(&vol->ring_lock);
    return err;
}

int vpv_volume_ring_stats(struct vpv_volume *vol, struct vpv_ring_stats *out)
{
    pthread_mutex_lock(&vol->ring_lock);
    out->area_size = vol->super.area_size;
    out->head = vol->super.head;
    out->tail = vol->super.tail;
    out->next_seq = vol->super.next_seq;
    out->records = vol->super.records;
    out->dropped = vol->super.dropped;
    out->rejected = vol->super.rejected;
    out->bytes_used = vol->super.tail - vol->super.head;
    pthread_mutex_unlock(&vol->ring_lock);
    return 0;
}

int vpv_volume_ring_reset(struct vpv_volume *vol)
{
    /* Readers see an empty ring; sequence numbers and the hash chain carry on, so records
     * written later still prove they follow the discarded ones. */
    pthread_mutex_lock(&vol->ring_lock);
    vol->super.head = vol->super.tail;
    vol->super.records = 0;
    int err = store_super(vol);
    if (!err)
        vol->super_dirty = 0;
    pthread_mutex_unlock(&vol->ring_lock);
    return err;
}

int vpv_volume_ring_reload(struct vpv_volume *vol)
{
    pthread_mutex_lock(&vol->ring_lock);
    int err = load_super(vol);
    pthread_mutex_unlock(&vol->ring_lock);
    return err;
}

int vpv_zero_range(int fd, uint64_t offset, uint64_t length)
{
    if (length == 0)
        return 0;
    if (fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, (off_t)offset, (off_t)length) == 0)
        return 0;
    if (fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_ZERO_RANGE, (off_t)offset, (off_t)length) == 0)
        return 0;
    static const uint8_t zeros[65536];
    while (length > 0) {
        size_t chunk = length < sizeof(zeros) ? (size_t)length : sizeof(zeros);
        int err = pwrite_full(fd, zeros, chunk, (off_t)offset);
        if (err)
            return err;
        offset += chunk;
        length -= chunk;
    }
    return 0;
}
