/*
 * vpv_header.h: the volume header record on disk, for C programs that read volume files.
 *
 * Mirrors vhost_pv/volume/header.py (a test compiles this header and compares sizes and
 * field offsets with the construct declarations). A volume file starts with two copies
 * ("slots") of struct vpv_header_slot, at offsets 0 and 4096, each zero-padded to 4096
 * bytes; the one with the highest generation whose CRC32 (zlib's, over the body) is right
 * is current. The body grew by appending: version 1 is struct vpv_header_body alone,
 * version 2 appends struct vpv_owner_binding, version 3 struct vpv_vm_binding; a reader
 * takes the layout from the version field and the CRC from right after that body.
 * Integers are little-endian; strings are UTF-8, zero-padded, not necessarily terminated.
 */
#ifndef VPV_HEADER_H
#define VPV_HEADER_H
#include <stdint.h>

#define VPV_HEADER_MAGIC "VHOSTPV\x01"
#define VPV_HEADER_VERSION 3
#define VPV_HEADER_SLOT_SIZE 4096
#define VPV_HEADER_FLAG_READ_ONLY 1
#define VPV_HEADER_FLAG_BOTH_COPIES 2
#define VPV_HEADER_MAX_IDS 8

/* The whole body of a version 1 header (392 bytes). */
struct vpv_header_body {
    uint8_t magic[8];
    uint16_t version;
    uint16_t pad0;
    uint32_t flags;
    uint64_t generation;
    uint8_t uuid[16];
    uint64_t created_ns;
    uint64_t data_offset;
    uint64_t capacity;
    uint64_t ring_offset;
    uint64_t ring_size;
    uint32_t state;          /* VPV_STATE_* (vhost_pv.h) */
    uint8_t read_policy;     /* VPV_READ_* */
    uint8_t ring_full_policy; /* VPV_RING_FULL_* */
    uint8_t ttl_action;
    uint8_t pad1;
    uint64_t ttl_seconds;
    uint64_t dangling_since_ns;
    char reason[64];
    char owner[128];
    int32_t allowed_uids[VPV_HEADER_MAX_IDS]; /* -1: unused */
    int32_t allowed_gids[VPV_HEADER_MAX_IDS];
    char dangling_source[32];
} __attribute__((packed));

/* Version 2: the owner container (160 bytes). owner_pid_start is /proc/PID/stat field 22. */
struct vpv_owner_binding {
    char owner_name[64];
    char owner_image[80];
    uint32_t owner_pid;
    uint32_t pad;
    uint64_t owner_pid_start;
} __attribute__((packed));

/* Version 3: the VM whose QEMU may attach (208 bytes). Empty fields (an all-zero uuid, an
 * empty string) match any VM; every field that is set must match the connecting process:
 * its -uuid, its -name guest name, its cgroup (a path starting with '/': that cgroup or one
 * below it; otherwise a unit name, glob allowed, matched against each path component). */
struct vpv_vm_binding {
    uint8_t vm_uuid[16];
    char vm_name[64];
    char vm_cgroup[128];
} __attribute__((packed));

struct vpv_header_body_v3 {
    struct vpv_header_body v1;
    struct vpv_owner_binding owner;
    struct vpv_vm_binding vm;
} __attribute__((packed));

struct vpv_header_slot {
    struct vpv_header_body_v3 body;
    uint32_t crc32_of_body;
} __attribute__((packed));

#endif
