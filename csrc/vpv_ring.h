/*
 * vpv_ring.h: on-disk layout of the quarantine ring (the C side of vhost_pv/volume/ring.py).
 *
 * The ring region at header.ring_offset is a 4 KiB superblock followed by the record area.
 * Records are 512-byte aligned: a 512-byte record header, then the payload padded to 512.
 * Positions (head, tail) are logical byte counts that only grow; the physical offset in the
 * area is position % area_size, and a record never straddles the end of the area (a PAD
 * record fills the gap). The ring is empty when head == tail.
 *
 * Every record carries the SHA-256 of its payload and of its own header (record_hash), and
 * the record_hash of the record before it (prev_hash): a chain an attacker cannot edit
 * without breaking. The Python declarations must keep these exact offsets; a test compiles
 * a program against this header and compares.
 *
 * All integers little-endian.
 */
#ifndef VPV_RING_H
#define VPV_RING_H
#include <stdint.h>

#define VPV_RING_MAGIC "VPVRING1"
#define VPV_RING_VERSION 1
#define VPV_RING_SUPER_SIZE 4096
#define VPV_RING_ALIGN 512
#define VPV_RECORD_MAGIC 0x51525056u /* "VPRQ" little-endian */
#define VPV_RECORD_HEADER_SIZE 512

/* Record types. */
#define VPV_RECORD_WRITE 1
#define VPV_RECORD_DISCARD 2
#define VPV_RECORD_WRITE_ZEROES 3
#define VPV_RECORD_PAD 0xffff

struct vpv_ring_super {
    uint8_t magic[8];          /* VPV_RING_MAGIC */
    uint32_t version;
    uint32_t align;            /* VPV_RING_ALIGN */
    uint64_t area_offset;      /* from the ring region start: VPV_RING_SUPER_SIZE */
    uint64_t area_size;        /* bytes, multiple of VPV_RING_ALIGN */
    uint64_t head;             /* logical position of the oldest record */
    uint64_t tail;             /* logical position where the next record goes */
    uint64_t next_seq;         /* sequence number of the next record (first is 1) */
    uint64_t records;          /* records between head and tail (PAD not counted) */
    uint64_t dropped;          /* records overwritten under the overwrite policy */
    uint64_t rejected;         /* writes refused because the ring was full */
    uint8_t last_hash[32];     /* record_hash of the newest record, zeros when none yet */
    uint32_t crc32;            /* CRC-32 (zlib) of every byte above */
    uint32_t pad;
} __attribute__((packed));     /* 120 bytes */

struct vpv_ring_record {
    uint32_t magic;            /* VPV_RECORD_MAGIC */
    uint16_t type;             /* VPV_RECORD_* */
    uint16_t queue;            /* virtqueue the request came from */
    uint64_t seq;
    uint64_t time_ns;          /* CLOCK_REALTIME */
    uint64_t sector;           /* first sector the guest addressed */
    uint32_t length;           /* bytes the request covered on the disk */
    uint32_t payload_len;      /* bytes of payload stored after this header */
    uint32_t source;           /* the frontend connection (daemon connection id) */
    uint32_t total_len;        /* header + padded payload: the step to the next record */
    uint8_t payload_sha256[32];
    uint8_t prev_hash[32];     /* record_hash of the record before, zeros for the first */
    uint8_t record_hash[32];   /* SHA-256 of the bytes of this struct before record_hash */
} __attribute__((packed));     /* 144 bytes, zero-padded to VPV_RECORD_HEADER_SIZE */

#endif
