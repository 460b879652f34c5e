/*
 * fs.c: the virtqueues of a virtio-fs device (the metadata file system).
 *
 * The rings are walked by the same hardened code as the block device (vring.c: bounds
 * checks against the memory table, loops, indirect tables). What a request means is FUSE
 * and is answered in Python, one request at a time: the metadata file system is small and
 * rarely read, unlike a disk. vpv_fs_pop copies a request's readable bytes out of guest
 * memory and keeps its chain until vpv_fs_push copies the reply into its writable buffers,
 * publishes it and interrupts the guest when the driver wants that.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vring.h"

struct vpv_fs_queue {
    int started;
    int broken;               /* its guest memory vanished: nothing touches it any more */
    int has_chain;            /* a popped chain waits for its reply */
    int call_fd;
    struct vpv_vring vr;
    struct vpv_chain chain;
};

struct vpv_fs {
    struct vpv_memory mem;
    struct vpv_fs_queue queues[VPV_FS_MAX_QUEUES];
};

struct vpv_fs *vpv_fs_new(void)
{
    vpv_guard_install();
    return calloc(1, sizeof(struct vpv_fs));
}

void vpv_fs_free(struct vpv_fs *fs)
{
    if (!fs)
        return;
    vpv_memory_unmap(&fs->mem);
    free(fs);
}

int vpv_fs_set_memory(struct vpv_fs *fs, const struct vpv_mem_region_desc *regions, uint32_t count)
{
    for (uint32_t i = 0; i < VPV_FS_MAX_QUEUES; i++)
        if (fs->queues[i].started)
            return -EBUSY;
    return vpv_memory_map(&fs->mem, regions, count);
}

int vpv_fs_queue_start(struct vpv_fs *fs, uint32_t index, const struct vpv_vring_config *cfg)
{
    if (index >= VPV_FS_MAX_QUEUES)
        return -EINVAL;
    struct vpv_fs_queue *q = &fs->queues[index];
    if (q->started)
        return -EBUSY;
    int err = vpv_vring_init(&q->vr, &fs->mem, cfg);
    if (err)
        return err;
    /* The call fd is written on the event loop thread: it must never block it (see
     * set_nonblocking in blk.c; the control plane sets O_NONBLOCK too). */
    if (cfg->call_fd >= 0) {
        int fl = fcntl(cfg->call_fd, F_GETFL);
        if (fl < 0 || fcntl(cfg->call_fd, F_SETFL, fl | O_NONBLOCK) < 0)
            return -errno;
    }
    q->call_fd = cfg->call_fd;
    q->has_chain = 0;
    q->broken = 0;
    q->started = 1;
    return 0;
}

int vpv_fs_queue_stop(struct vpv_fs *fs, uint32_t index)
{
    if (index >= VPV_FS_MAX_QUEUES || !fs->queues[index].started)
        return -EINVAL;
    struct vpv_fs_queue *q = &fs->queues[index];
    if (q->has_chain && !q->broken) {   /* never answered: give the buffers back empty */
        sigjmp_buf env;
        sigjmp_buf *prev = vpv_guard_arm(NULL);
        if (sigsetjmp(env, 0) == 0) {
            vpv_guard_arm(&env);
            vpv_vring_push(&q->vr, q->chain.head, 0);
        }
        vpv_guard_restore(prev);
    }
    q->started = 0;
    q->has_chain = 0;
    q->call_fd = -1;
    return q->vr.last_avail_idx;
}

static void notify(struct vpv_fs_queue *q)
{
    if (q->call_fd >= 0 && vpv_vring_should_notify(&q->vr)) {
        /* This runs on the event loop thread, which no peer may block. The frontend shares
         * the description and could have cleared O_NONBLOCK since the queue started: set it
         * again first (an eventfd write has no per-call RWF_NOWAIT). What remains is a
         * frontend racing to clear it between these two calls while the counter is full;
         * the metadata frontend is the allow-listed QEMU, not an arbitrary peer. */
        int fl = fcntl(q->call_fd, F_GETFL);
        if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(q->call_fd, F_SETFL, fl | O_NONBLOCK) < 0))
            return;
        uint64_t one = 1;
        (void)!write(q->call_fd, &one, sizeof(one));   /* EAGAIN: an interrupt is pending */
    }
}

/* pop and push run on the daemon's event loop thread: a fault in guest memory (the frontend
 * shrank its memory file) must end this connection, not the process. Each runs its body
 * under the SIGBUS guard; a fault breaks the queue and returns -EFAULT. */
static int fs_pop_body(struct vpv_fs *fs, struct vpv_fs_queue *q, uint8_t *buf, uint32_t cap,
                      uint32_t *head, uint32_t *writable);
static int fs_push_body(struct vpv_fs_queue *q, uint32_t head, const uint8_t *reply, uint32_t len);

int vpv_fs_pop(struct vpv_fs *fs, uint32_t index, uint8_t *buf, uint32_t cap, uint32_t *head,
               uint32_t *writable)
{
    if (index >= VPV_FS_MAX_QUEUES || !fs->queues[index].started)
        return -EINVAL;
    struct vpv_fs_queue *q = &fs->queues[index];
    if (q->broken)
        return -EIO;
    if (q->has_chain)
        return -EBUSY;   /* the previous request has not been answered */
    sigjmp_buf env;
    sigjmp_buf *prev = vpv_guard_arm(NULL);
    if (sigsetjmp(env, 0)) {
        vpv_guard_restore(prev);
        q->broken = 1;
        q->has_chain = 0;
        return -EFAULT;
    }
    vpv_guard_arm(&env);
    int rc = fs_pop_body(fs, q, buf, cap, head, writable);
    vpv_guard_restore(prev);
    return rc;
}

int vpv_fs_push(struct vpv_fs *fs, uint32_t index, uint32_t head, const uint8_t *reply, uint32_t len)
{
    if (index >= VPV_FS_MAX_QUEUES || !fs->queues[index].started)
        return -EINVAL;
    struct vpv_fs_queue *q = &fs->queues[index];
    if (q->broken)
        return -EIO;
    sigjmp_buf env;
    sigjmp_buf *prev = vpv_guard_arm(NULL);
    if (sigsetjmp(env, 0)) {
        vpv_guard_restore(prev);
        q->broken = 1;
        q->has_chain = 0;
        return -EFAULT;
    }
    vpv_guard_arm(&env);
    int rc = fs_push_body(q, head, reply, len);
    vpv_guard_restore(prev);
    return rc;
}

static int fs_pop_body(struct vpv_fs *fs, struct vpv_fs_queue *q, uint8_t *buf, uint32_t cap,
                      uint32_t *head, uint32_t *writable)
{
    for (;;) {
        vpv_vring_disable_kicks(&q->vr);
        enum vpv_pop r = vpv_vring_pop(&q->vr, &fs->mem, &q->chain);
        if (r == VPV_POP_EMPTY) {
            if (vpv_vring_enable_kicks(&q->vr))
                continue;   /* something arrived while kicks were off */
            return -EAGAIN;
        }
        if (r == VPV_POP_BROKEN)
            return -EIO;
        struct vpv_chain *c = &q->chain;
        if (r == VPV_POP_BAD_CHAIN || c->bad || c->in_bytes > cap) {
            /* Nothing we can answer through: give the buffers back empty. */
            vpv_vring_push(&q->vr, c->head, 0);
            notify(q);
            return -EBADMSG;
        }
        size_t copied = 0;
        for (uint32_t i = 0; i < c->n_in; i++) {
            memcpy(buf + copied, c->iov[i].iov_base, c->iov[i].iov_len);
            copied += c->iov[i].iov_len;
        }
        *head = c->head;
        *writable = c->out_bytes > UINT32_MAX ? UINT32_MAX : (uint32_t)c->out_bytes;
        q->has_chain = 1;
        return (int)copied;
    }
}

static int fs_push_body(struct vpv_fs_queue *q, uint32_t head, const uint8_t *reply, uint32_t len)
{
    struct vpv_chain *c = &q->chain;
    if (!q->has_chain || c->head != head)
        return -ENOENT;
    if (len > c->out_bytes)
        len = 0;   /* does not fit: the caller checked; never write past the buffers */
    uint32_t done = 0;
    for (uint32_t i = c->n_in; i < c->n_in + c->n_out && done < len; i++) {
        uint32_t chunk = len - done < c->iov[i].iov_len ? len - done : (uint32_t)c->iov[i].iov_len;
        memcpy(c->iov[i].iov_base, reply + done, chunk);
        done += chunk;
    }
    vpv_vring_push(&q->vr, head, done);
    q->has_chain = 0;
    notify(q);
    return (int)done;
}
