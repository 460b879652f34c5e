/*
 * sha256.c: SHA-256 (FIPS 180-4) for the quarantine ring's payload digests and hash chain.
 *
 * The data path needs a cryptographic hash without pulling a crypto library into the
 * build; the ring is verified from Python with hashlib, so any slip here shows up at once.
 */
#include <string.h>

#include "vring.h"

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void compress(struct vpv_sha256 *s, const uint8_t *block)
{
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)block[4 * i] << 24 | (uint32_t)block[4 * i + 1] << 16 |
               (uint32_t)block[4 * i + 2] << 8 | block[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3];
    uint32_t e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    s->h[0] += a;
    s->h[1] += b;
    s->h[2] += c;
    s->h[3] += d;
    s->h[4] += e;
    s->h[5] += f;
    s->h[6] += g;
    s->h[7] += h;
}

#if defined(__x86_64__)
#include <immintrin.h>

/* The same compression with the x86 SHA extensions (SHA-NI), about ten times faster: every
 * quarantined write is hashed in the worker thread, so this is on the data path. The state
 * is kept as ABEF / CDGH vectors, the layout sha256rnds2 works on. */
__attribute__((target("sha,sse4.1"))) static void compress_shani(struct vpv_sha256 *s,
                                                                 const uint8_t *block)
{
    const __m128i byteswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i tmp = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&s->h[0]), 0xB1);
    __m128i state1 = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&s->h[4]), 0x1B);
    __m128i state0 = _mm_alignr_epi8(tmp, state1, 8);   /* ABEF */
    state1 = _mm_blend_epi16(state1, tmp, 0xF0);        /* CDGH */
    __m128i abef = state0, cdgh = state1;

    __m128i w[16];
    for (int k = 0; k < 4; k++)
        w[k] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(block + 16 * k)), byteswap);
    for (int k = 4; k < 16; k++) {
        /* w[t] = w[t-16] + s0(w[t-15]) + w[t-7] + s1(w[t-2]), four words at a time. */
        __m128i t = _mm_sha256msg1_epu32(w[k - 4], w[k - 3]);
        t = _mm_add_epi32(t, _mm_alignr_epi8(w[k - 1], w[k - 2], 4));
        w[k] = _mm_sha256msg2_epu32(t, w[k - 1]);
    }
    for (int k = 0; k < 16; k++) {
        __m128i msg = _mm_add_epi32(w[k], _mm_loadu_si128((const __m128i *)&K[4 * k]));
        state1 = _mm_sha256rnds2_epu32(state1, state0, msg);
        state0 = _mm_sha256rnds2_epu32(state0, state1, _mm_shuffle_epi32(msg, 0x0E));
    }
    state0 = _mm_add_epi32(state0, abef);
    state1 = _mm_add_epi32(state1, cdgh);

    tmp = _mm_shuffle_epi32(state0, 0x1B);              /* FEBA */
    state1 = _mm_shuffle_epi32(state1, 0xB1);           /* DCHG */
    _mm_storeu_si128((__m128i *)&s->h[0], _mm_blend_epi16(tmp, state1, 0xF0));  /* DCBA */
    _mm_storeu_si128((__m128i *)&s->h[4], _mm_alignr_epi8(state1, tmp, 8));     /* HGFE */
}

static void (*select_compress(void))(struct vpv_sha256 *, const uint8_t *)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sha") && __builtin_cpu_supports("sse4.1"))
        return compress_shani;
    return compress;
}
#else
static void (*select_compress(void))(struct vpv_sha256 *, const uint8_t *)
{
    return compress;
}
#endif

static void (*compress_fn)(struct vpv_sha256 *, const uint8_t *);

void vpv_sha256_init(struct vpv_sha256 *s)
{
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, iv, sizeof(iv));
    /* Benign race: every thread computes the same pointer. */
    if (!__atomic_load_n(&compress_fn, __ATOMIC_RELAXED))
        __atomic_store_n(&compress_fn, select_compress(), __ATOMIC_RELAXED);
    s->length = 0;
    s->fill = 0;
}

void vpv_sha256_update(struct vpv_sha256 *s, const void *data, size_t len)
{
    const uint8_t *p = data;
    s->length += len;
    if (s->fill) {
        size_t take = 64 - s->fill < len ? 64 - s->fill : len;
        memcpy(s->buf + s->fill, p, take);
        s->fill += take;
        p += take;
        len -= take;
        if (s->fill < 64)
            return;
        compress_fn(s, s->buf);
        s->fill = 0;
    }
    for (; len >= 64; p += 64, len -= 64)
        compress_fn(s, p);
    memcpy(s->buf, p, len);
    s->fill = len;
}

void vpv_sha256_final(struct vpv_sha256 *s, uint8_t out[32])
{
    uint64_t bits = s->length * 8;
    uint8_t pad = 0x80;
    vpv_sha256_update(s, &pad, 1);
    pad = 0;
    while (s->fill != 56)
        vpv_sha256_update(s, &pad, 1);
    uint8_t len_be[8];
    for (int i = 0; i < 8; i++)
        len_be[i] = (uint8_t)(bits >> (56 - 8 * i));
    vpv_sha256_update(s, len_be, 8);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(s->h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(s->h[i] >> 8);
        out[4 * i + 3] = (uint8_t)s->h[i];
    }
}
