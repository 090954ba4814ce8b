/*
 * qnetem_rng.c - Philox4x32-10 counter-based RNG.
 *
 * Philox4x32-R (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
 * SC'11, section 3.2 and table 2): a 10-round keyed bijection of a 128-bit counter.
 * One round with multipliers M0, M1 and round key (k0, k1):
 *     (hi0, lo0) = M0 * c0,  (hi1, lo1) = M1 * c2       (32x32 -> 64-bit products)
 *     c' = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
 * and the key is bumped by the Weyl constants (W0, W1) between rounds. The constants
 * are those of Random123's philox.h; the known-answer vectors of Random123's
 * kat_vectors file are checked in tests/unit/test_rng.py.
 *
 * qnetem's sample i of (key, stream): counter = (i lo, i hi, stream lo, stream hi),
 * key = (key lo, key hi); u64 = x0 | x1 << 32; uniform = (u64 >> 11) * 2^-53, i.e. the
 * top 53 bits as a double in [0, 1). Words x2, x3 are discarded so that sample i depends
 * on i alone (random access, no buffering across calls).
 */
#include "qnetem.h"

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

static inline void philox_block(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                uint32_t k0, uint32_t k1, uint32_t x[4]) {
    int round;
    for (round = 0; round < 10; ++round) {
        const uint64_t p0 = (uint64_t)PHILOX_M0 * c0;
        const uint64_t p1 = (uint64_t)PHILOX_M1 * c2;
        const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1;
        c3 = (uint32_t)p0;
        c0 = n0;
        c2 = n2;
        k0 += PHILOX_W0; /* the bump after the last round is never used */
        k1 += PHILOX_W1;
    }
    x[0] = c0;
    x[1] = c1;
    x[2] = c2;
    x[3] = c3;
}

void qnetem_philox4x32_10(const uint32_t *ctr, const uint32_t *key, uint32_t *out) {
    philox_block(ctr[0], ctr[1], ctr[2], ctr[3], key[0], key[1], out);
}

static int check_range(uint64_t start, size_t count, const void *out) {
    if (count == 0) return QNETEM_OK;
    if (out == NULL) return QNETEM_ERR_NULL;
    /* indices start .. start+count-1 must not wrap around 2^64 */
    if ((uint64_t)(count - 1) > UINT64_MAX - start) return QNETEM_ERR_ARG;
    return QNETEM_OK;
}

static inline uint64_t sample_u64(uint64_t key, uint64_t stream, uint64_t i) {
    uint32_t x[4];
    philox_block((uint32_t)i, (uint32_t)(i >> 32), (uint32_t)stream, (uint32_t)(stream >> 32),
                 (uint32_t)key, (uint32_t)(key >> 32), x);
    return (uint64_t)x[0] | ((uint64_t)x[1] << 32);
}

int qnetem_rng_u64(uint64_t key, uint64_t stream, uint64_t start, size_t count,
                   uint64_t *out) {
    size_t j;
    int rc = check_range(start, count, out);
    if (rc) return rc;
    for (j = 0; j < count; ++j) out[j] = sample_u64(key, stream, start + j);
    return QNETEM_OK;
}

int qnetem_rng_uniform(uint64_t key, uint64_t stream, uint64_t start, size_t count,
                       double *out) {
    size_t j;
    int rc = check_range(start, count, out);
    if (rc) return rc;
    /* 2^-53 = 1.1102230246251565e-16; (u64 >> 11) < 2^53 converts exactly. */
    for (j = 0; j < count; ++j) out[j] = (double)(sample_u64(key, stream, start + j) >> 11) * 0x1.0p-53;
    return QNETEM_OK;
}
