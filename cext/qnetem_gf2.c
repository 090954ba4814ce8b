/*
 * qnetem_gf2.c - GF(2) kernels on bit-packed keys (the parity work of Cascade).
 *
 * Layout (shared with the numpy twin, emulator/kernels/_numpy.py): a key of n_bits bits
 * is an array of ceil(n_bits / 64) uint64 words; bit i of the key is bit (i % 64) of word
 * i / 64, least significant bit first (so on a little-endian machine the packed array,
 * viewed as bytes, is numpy.packbits(bits, bitorder="little") padded to whole words).
 * Bits at positions >= n_bits in the last word are padding: every kernel ignores them
 * on input, and the kernels that write words (pack, gather) set them to zero.
 *
 * Why these kernels: Cascade (Brassard & Salvail, EUROCRYPT '93) spends its time
 * computing parities of blocks of a shuffled key. A pass shuffles the key once
 * (qnetem_gf2_gather: out bit j = in bit index[j]); every block of that pass, and every
 * half-block of a binary search, is then a contiguous range of the shuffled key, whose
 * parity is a popcount over whole words plus two masked edge words
 * (qnetem_gf2_parities_ranges) - 64 key bits per operation. qnetem_gf2_parities_indexed
 * does the same without a shuffled copy (parity of key[index[start:stop]]) for callers
 * that do not keep one. Corrections flip single bits (qnetem_gf2_flip_bits); the frame
 * error check is a Hamming distance (qnetem_gf2_hamming).
 *
 * Contract: as qnetem.h - QNETEM_OK or a negative status, no allocation, no state; a bad
 * position or range (>= n_bits, start > stop) is QNETEM_ERR_ARG and, for the kernels
 * that write, is detected before anything is written.
 */
#include "qnetem.h"

#define WORD_BITS 64u

static inline size_t n_words(size_t n_bits) { return (n_bits + WORD_BITS - 1) / WORD_BITS; }

static inline int popcount64(uint64_t x) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_popcountll(x);
#else
    /* Hacker's Delight, figure 5-2 */
    x = x - ((x >> 1) & 0x5555555555555555ull);
    x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0Full;
    return (int)((x * 0x0101010101010101ull) >> 56);
#endif
}

/* Mask of the bits [lo, hi) of one word, 0 <= lo <= hi <= 64. */
static inline uint64_t span_mask(unsigned lo, unsigned hi) {
    const uint64_t upto_hi = hi >= WORD_BITS ? ~0ull : ((1ull << hi) - 1ull);
    const uint64_t below_lo = lo >= WORD_BITS ? ~0ull : ((1ull << lo) - 1ull);
    return upto_hi & ~below_lo;
}

/* Parity of bits [start, stop) of a packed key; the caller checked start <= stop <= n. */
static inline int range_parity(const uint64_t *words, size_t start, size_t stop) {
    size_t w0, w1, w;
    uint64_t acc;
    if (start >= stop) return 0;
    w0 = start / WORD_BITS;
    w1 = (stop - 1) / WORD_BITS;
    if (w0 == w1) {
        acc = words[w0] & span_mask((unsigned)(start % WORD_BITS), (unsigned)((stop - 1) % WORD_BITS) + 1u);
        return popcount64(acc) & 1;
    }
    acc = words[w0] & span_mask((unsigned)(start % WORD_BITS), WORD_BITS);
    for (w = w0 + 1; w < w1; ++w) acc ^= words[w];
    acc ^= words[w1] & span_mask(0u, (unsigned)((stop - 1) % WORD_BITS) + 1u);
    return popcount64(acc) & 1;
}

static inline int get_bit(const uint64_t *words, uint64_t i) {
    return (int)((words[i / WORD_BITS] >> (i % WORD_BITS)) & 1u);
}

int qnetem_gf2_pack(const uint8_t *bits, size_t n_bits, uint64_t *words) {
    size_t i, w;
    if (n_bits == 0) return QNETEM_OK;
    if (bits == NULL || words == NULL) return QNETEM_ERR_NULL;
    for (i = 0; i < n_bits; ++i)
        if (bits[i] > 1u) return QNETEM_ERR_ARG;
    for (w = 0; w < n_words(n_bits); ++w) {
        const size_t base = w * WORD_BITS;
        const size_t end = base + WORD_BITS < n_bits ? base + WORD_BITS : n_bits;
        uint64_t acc = 0;
        for (i = base; i < end; ++i) acc |= (uint64_t)bits[i] << (i - base);
        words[w] = acc;
    }
    return QNETEM_OK;
}

int qnetem_gf2_unpack(const uint64_t *words, size_t n_bits, uint8_t *bits) {
    size_t i;
    if (n_bits == 0) return QNETEM_OK;
    if (bits == NULL || words == NULL) return QNETEM_ERR_NULL;
    for (i = 0; i < n_bits; ++i) bits[i] = (uint8_t)get_bit(words, i);
    return QNETEM_OK;
}

int qnetem_gf2_parity_range(const uint64_t *words, size_t n_bits, size_t start, size_t stop,
                            int *parity_out) {
    if (parity_out == NULL) return QNETEM_ERR_NULL;
    if (start > stop || stop > n_bits) return QNETEM_ERR_ARG;
    if (start == stop) {
        *parity_out = 0;
        return QNETEM_OK;
    }
    if (words == NULL) return QNETEM_ERR_NULL;
    *parity_out = range_parity(words, start, stop);
    return QNETEM_OK;
}

int qnetem_gf2_parities_ranges(const uint64_t *words, size_t n_bits, const int64_t *starts,
                               const int64_t *stops, size_t count, uint8_t *out) {
    size_t b;
    if (count == 0) return QNETEM_OK;
    if (starts == NULL || stops == NULL || out == NULL) return QNETEM_ERR_NULL;
    for (b = 0; b < count; ++b)
        if (starts[b] < 0 || starts[b] > stops[b] || (uint64_t)stops[b] > (uint64_t)n_bits)
            return QNETEM_ERR_ARG;
    if (n_bits > 0 && words == NULL) return QNETEM_ERR_NULL;
    for (b = 0; b < count; ++b)
        out[b] = (uint8_t)range_parity(words, (size_t)starts[b], (size_t)stops[b]);
    return QNETEM_OK;
}

int qnetem_gf2_parities_indexed(const uint64_t *words, size_t n_bits, const int64_t *index,
                                size_t n_index, const int64_t *starts, const int64_t *stops,
                                size_t count, uint8_t *out) {
    size_t b;
    int64_t j;
    if (count == 0) return QNETEM_OK;
    if (starts == NULL || stops == NULL || out == NULL) return QNETEM_ERR_NULL;
    for (b = 0; b < count; ++b)
        if (starts[b] < 0 || starts[b] > stops[b] || (uint64_t)stops[b] > (uint64_t)n_index)
            return QNETEM_ERR_ARG;
    if (n_index > 0 && (index == NULL || (n_bits > 0 && words == NULL))) return QNETEM_ERR_NULL;
    /* Only the positions the ranges touch are read, so only those are checked. */
    for (b = 0; b < count; ++b)
        for (j = starts[b]; j < stops[b]; ++j)
            if (index[j] < 0 || (uint64_t)index[j] >= (uint64_t)n_bits) return QNETEM_ERR_ARG;
    for (b = 0; b < count; ++b) {
        int acc = 0;
        for (j = starts[b]; j < stops[b]; ++j) acc ^= get_bit(words, (uint64_t)index[j]);
        out[b] = (uint8_t)acc;
    }
    return QNETEM_OK;
}

int qnetem_gf2_gather(const uint64_t *words, size_t n_bits, const int64_t *index, size_t n_out,
                      uint64_t *out_words) {
    size_t j, w;
    if (n_out == 0) return QNETEM_OK;
    if (index == NULL || out_words == NULL || (n_bits > 0 && words == NULL)) return QNETEM_ERR_NULL;
    for (j = 0; j < n_out; ++j)
        if (index[j] < 0 || (uint64_t)index[j] >= (uint64_t)n_bits) return QNETEM_ERR_ARG;
    for (w = 0; w < n_words(n_out); ++w) {
        const size_t base = w * WORD_BITS;
        const size_t end = base + WORD_BITS < n_out ? base + WORD_BITS : n_out;
        uint64_t acc = 0;
        for (j = base; j < end; ++j) acc |= (uint64_t)get_bit(words, (uint64_t)index[j]) << (j - base);
        out_words[w] = acc;
    }
    return QNETEM_OK;
}

int qnetem_gf2_flip_bits(uint64_t *words, size_t n_bits, const int64_t *positions, size_t count) {
    size_t k;
    if (count == 0) return QNETEM_OK;
    if (words == NULL || positions == NULL) return QNETEM_ERR_NULL;
    for (k = 0; k < count; ++k)
        if (positions[k] < 0 || (uint64_t)positions[k] >= (uint64_t)n_bits) return QNETEM_ERR_ARG;
    for (k = 0; k < count; ++k) {
        const uint64_t i = (uint64_t)positions[k];
        words[i / WORD_BITS] ^= 1ull << (i % WORD_BITS);
    }
    return QNETEM_OK;
}

int qnetem_gf2_hamming(const uint64_t *a, const uint64_t *b, size_t n_bits, uint64_t *distance_out) {
    size_t w, full;
    uint64_t d = 0;
    if (distance_out == NULL) return QNETEM_ERR_NULL;
    if (n_bits > 0 && (a == NULL || b == NULL)) return QNETEM_ERR_NULL;
    full = n_bits / WORD_BITS;
    for (w = 0; w < full; ++w) d += (uint64_t)popcount64(a[w] ^ b[w]);
    if (n_bits % WORD_BITS)
        d += (uint64_t)popcount64((a[full] ^ b[full]) & span_mask(0u, (unsigned)(n_bits % WORD_BITS)));
    *distance_out = d;
    return QNETEM_OK;
}
