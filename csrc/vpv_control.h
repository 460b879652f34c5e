/*
 * vpv_control.h: the control socket's messages, for C programs that talk to `vhost-pv serve`.
 *
 * Mirrors vhost_pv/control/wire.py (a test compiles this header and compares sizes, offsets
 * and command numbers). A request is a struct vpv_ctl_header followed by `length` bytes, the
 * fixed request struct of the command; the reply is a header (FLAG_REPLY set, same cmd and
 * seq) followed by int32 status (0 or -errno) and the reply body: a fixed struct for
 * Persistent_Disk_Dangling, JSON for the others. Integers are little-endian.
 */
#ifndef VPV_CONTROL_H
#define VPV_CONTROL_H
#include <linux/ioctl.h>
#include <stdint.h>

#define VPV_CTL_MAGIC "VPVC"
#define VPV_CTL_VERSION 1
#define VPV_CTL_FLAG_REPLY 1

struct vpv_ctl_header {
    char magic[4];
    uint16_t version;
    uint16_t flags;
    uint32_t cmd;
    uint32_t seq;
    uint32_t length;
} __attribute__((packed));

#define VPV_CTL_DANGLING_CLEAR 1
struct vpv_ctl_dangling {
    char volume[64];
    uint32_t flags;
    uint32_t pad;
    char reason[128];
} __attribute__((packed));

struct vpv_ctl_dangling_reply {
    uint32_t state;
    uint32_t changed;
    uint64_t generation;
    uint64_t dangling_since_ns;
    uint64_t flip_ns;
} __attribute__((packed));

#define VPV_RECLAIM_KEEP 0
#define VPV_RECLAIM_REPLAY 1
#define VPV_RECLAIM_DISCARD 2
struct vpv_ctl_reclaim {
    char volume[64];
    char owner[128];
    uint32_t mode;
    uint32_t pad;
} __attribute__((packed));

#define VPV_RING_LIST 0
#define VPV_RING_DUMP 1
#define VPV_RING_REPLAY 2
#define VPV_RING_DISCARD 3
struct vpv_ctl_ring {
    char volume[64];
    uint32_t op;
    uint32_t pad;
} __attribute__((packed));

#define VPV_CTL_DELETE_FORCE 1
struct vpv_ctl_volume {
    char volume[64];
    uint32_t flags;
    uint32_t pad;
} __attribute__((packed));

#define VPV_CTL_ALERTS_FOLLOW 1
struct vpv_ctl_alerts {
    uint32_t flags;
    uint32_t pad;
    uint64_t since_seq;
} __attribute__((packed));

struct vpv_ctl_bind {
    char volume[64];
    char container[128];
    uint32_t pid;
    uint32_t pad;
} __attribute__((packed));

#define VPV_META_GET 0
#define VPV_META_SET 1
#define VPV_META_REMOVE 2
#define VPV_META_LIST 3
#define VPV_META_BOOT 4
/* Followed by value_len bytes of value (SET). */
struct vpv_ctl_meta {
    uint32_t op;
    uint32_t value_len;
    char vm[64];
    char key[192];
} __attribute__((packed));

/* VOLUME_SET: only the fields whose VPV_CTL_SET_* bit is in mask change. An id list ends at
 * its first -1. Reply: JSON (old and new value of each changed field). */
#define VPV_CTL_SET_TTL (1u << 0)
#define VPV_CTL_SET_TTL_ACTION (1u << 1)
#define VPV_CTL_SET_READ_POLICY (1u << 2)
#define VPV_CTL_SET_RING_FULL_POLICY (1u << 3)
#define VPV_CTL_SET_ALLOWED_UIDS (1u << 4)
#define VPV_CTL_SET_ALLOWED_GIDS (1u << 5)
#define VPV_CTL_SET_OWNER (1u << 6)
#define VPV_CTL_CLEAR_OWNER (1u << 7)
struct vpv_ctl_volume_set {
    char volume[64];
    uint32_t mask;
    uint8_t read_policy;      /* VPV_READ_* */
    uint8_t ring_full_policy; /* VPV_RING_FULL_* */
    uint8_t ttl_action;       /* 0 alert, 1 delete */
    uint8_t pad;
    uint64_t ttl_seconds;     /* 0: no time limit */
    int32_t allowed_uids[8];
    int32_t allowed_gids[8];
    char owner[128];          /* container id, id prefix or name */
    uint32_t owner_pid;       /* without an engine: the owner's init pid (0: none) */
    uint32_t pad2;
} __attribute__((packed));

#define VPV_IOC_STATUS _IOC(_IOC_READ, 'v', 0x01, 0)
#define VPV_IOC_PERSISTENT_DISK_DANGLING _IOWR('v', 0x10, struct vpv_ctl_dangling)
#define VPV_IOC_RECLAIM _IOWR('v', 0x11, struct vpv_ctl_reclaim)
#define VPV_IOC_RING _IOWR('v', 0x12, struct vpv_ctl_ring)
#define VPV_IOC_DELETE _IOW('v', 0x13, struct vpv_ctl_volume)
#define VPV_IOC_ALERTS _IOWR('v', 0x14, struct vpv_ctl_alerts)
#define VPV_IOC_BIND _IOWR('v', 0x15, struct vpv_ctl_bind)
#define VPV_IOC_META _IOWR('v', 0x16, struct vpv_ctl_meta)
#define VPV_IOC_VOLUME_SET _IOWR('v', 0x1a, struct vpv_ctl_volume_set)

#endif
