/*
 * qnetem_polyhash.c - polynomial evaluation hash over GF(p), p = 2^127 - 1.
 *
 * Definition (the maths and the security bound are in nodes/qkd/_polyhash.py): the input
 * is cut into 15-byte little-endian blocks m_1 .. m_L (the last one zero-padded), a block
 * m_{L+1} = length is appended, and with a key r in [0, p)
 *
 *     h_r = sum_{i=1}^{L+1} m_i r^(L+2-i)  (mod p),
 *
 * i.e. Horner's rule h <- (h + m_i) r. Every block is < 2^120, the length < 2^64.
 *
 * Why C: the QKD link session authenticates every post-processing message and verifies
 * every corrected key with this hash (millions of blocks per emulated second); one block
 * costs ~0.4 us in Python integers and a few ns here.
 *
 * Arithmetic: numbers are two 64-bit limbs. A product of two such numbers is 4 limbs
 * (64x64 -> 128-bit multiplies), reduced with 2^127 = 1 (mod p): x = lo + 2^127 hi
 * == lo + hi, applied twice. Intermediate values are kept only partially reduced, in
 * [0, 2^127] (a "loose" value; 2^127 itself == 1); the result is fully reduced at the end.
 * Bounds: a loose h plus a block is < 2^127 + 2^120 + 1, times r < 2^127 is < 2^255,
 * so x >> 127 < 2^128 and the folds below never overflow (see mulmod).
 *
 * Speed: Horner's rule is one long dependency chain (a multiply-reduce per block). The
 * bulk of the input runs as LANES independent chains with key r^LANES (lane j takes the
 * blocks j, j+LANES, ...), which the CPU overlaps; the lanes are then combined with
 * r^LANES .. r^1 into exactly the Horner state after those blocks (derivation at
 * poly127_bulk), and the remaining < LANES blocks and the length block continue with
 * plain Horner steps. The same technique as Poly1305's vectorised implementations
 * (Bernstein, FSE 2005, section 3; Goll & Gueron, ITNG 2015).
 *
 * Reading: blocks are loaded byte-wise-portably (memcpy into limbs, little-endian
 * conversion on big-endian hosts); no byte past data[n - 1] is read.
 *
 * Contract: as qnetem.h - QNETEM_OK or a negative status, no allocation, no state.
 */
#include <string.h>

#include "qnetem.h"

#define BLOCK_BYTES 15u
#define LANES 4u

typedef struct {
    uint64_t lo;
    uint64_t hi;
} fe127; /* lo + 2^64 hi */

static const uint64_t MASK63 = 0x7FFFFFFFFFFFFFFFull;

#if defined(__SIZEOF_INT128__)
__extension__ typedef unsigned __int128 u128; /* __extension__: not ISO C99, gcc/clang have it */
#endif

/* 64 x 64 -> 128-bit product: returns the low word, *hi the high word. */
static inline uint64_t mul64(uint64_t a, uint64_t b, uint64_t *hi) {
#if defined(__SIZEOF_INT128__)
    const u128 p = (u128)a * b;
    *hi = (uint64_t)(p >> 64);
    return (uint64_t)p;
#else
    /* Schoolbook on 32-bit halves (Knuth TAOCP vol. 2, section 4.3.1, algorithm M). */
    const uint64_t a0 = a & 0xFFFFFFFFu, a1 = a >> 32, b0 = b & 0xFFFFFFFFu, b1 = b >> 32;
    const uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
    const uint64_t mid = (p00 >> 32) + (p01 & 0xFFFFFFFFu) + (p10 & 0xFFFFFFFFu);
    *hi = p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
    return (mid << 32) | (p00 & 0xFFFFFFFFu);
#endif
}

/* x + y for x loose (<= 2^127) and y < 2^121: < 2^128, no overflow. */
static inline fe127 add_small(fe127 x, fe127 y) {
    fe127 s;
    s.lo = x.lo + y.lo;
    s.hi = x.hi + y.hi + (s.lo < y.lo);
    return s;
}

/* a * b mod p, loose (in [0, 2^127]), for a < 2^127 + 2^121 and b <= 2^127.
 * The product w (4 limbs) is < 2^255. With lo = w mod 2^127 and hi = w >> 127 < 2^128,
 * and hi = h0 + 2^127 h1 (h1 in {0, 1}): w == lo + h0 + h1 < 2^128 (no overflow), then
 * one more fold gives a value <= 2^127 - 1 + 1. */
static inline fe127 mulmod(fe127 a, fe127 b) {
    uint64_t h00, h01, h10, h11, w1, w2, w3, c, t;
    const uint64_t w0 = mul64(a.lo, b.lo, &h00);
    const uint64_t l01 = mul64(a.lo, b.hi, &h01);
    const uint64_t l10 = mul64(a.hi, b.lo, &h10);
    const uint64_t l11 = mul64(a.hi, b.hi, &h11);
    fe127 lo, hi, s;

    /* Column sums with explicit carries. */
    w1 = h00 + l01;
    c = w1 < l01;
    w1 += l10;
    c += w1 < l10;
    w2 = h01 + c;
    c = w2 < c;
    w2 += h10;
    c += w2 < h10;
    w2 += l11;
    c += w2 < l11;
    w3 = h11 + c; /* w < 2^256 so no carry out */

    lo.lo = w0;
    lo.hi = w1 & MASK63;
    hi.lo = (w1 >> 63) | (w2 << 1);
    hi.hi = (w2 >> 63) | (w3 << 1);

    /* s = lo + (hi mod 2^127) + (hi >> 127) <= 2^128 - 1 */
    s.lo = lo.lo + hi.lo;
    t = s.lo < hi.lo;
    s.hi = lo.hi + (hi.hi & MASK63) + t;
    t = hi.hi >> 63;
    s.lo += t;
    s.hi += s.lo < t;
    /* fold once more: (s mod 2^127) + (s >> 127) <= 2^127 */
    t = s.hi >> 63;
    s.hi &= MASK63;
    s.lo += t;
    s.hi += s.lo < t;
    return s;
}

/* A loose value (<= 2^127) reduced into [0, p). */
static inline fe127 reduce_full(fe127 x) {
    /* x <= 2^127: x >= p iff x is p (hi = 2^63 - 1, lo = all ones) or 2^127 (hi = 2^63). */
    if (x.hi > MASK63 || (x.hi == MASK63 && x.lo == ~0ull)) {
        /* x - p = x + 1 - 2^127 */
        x.lo += 1;
        x.hi += (x.lo == 0);
        x.hi -= 0x8000000000000000ull;
    }
    return x;
}

/* (x + y) mod p, loose, for x loose (<= 2^127) and y in [0, p): x + y < 2^128 - 1; one fold. */
static inline fe127 addmod(fe127 x, fe127 y) {
    fe127 s;
    uint64_t t;
    s.lo = x.lo + y.lo;
    s.hi = x.hi + y.hi + (s.lo < y.lo);
    t = s.hi >> 63;
    s.hi &= MASK63;
    s.lo += t;
    s.hi += s.lo < t;
    return s;
}

static inline uint64_t load_le64(const uint8_t *p, size_t n_bytes) {
    uint64_t v = 0;
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(&v, p, n_bytes);
#else
    size_t i;
    for (i = 0; i < n_bytes; ++i) v |= (uint64_t)p[i] << (8 * i);
#endif
    return v;
}

/* A full 15-byte block starting at p. */
static inline fe127 load_block(const uint8_t *p) {
    fe127 m;
    m.lo = load_le64(p, 8);
    m.hi = load_le64(p + 8, 7);
    return m;
}

/* The last, partial block: n_bytes in [1, 15) bytes, zero-padded. */
static inline fe127 load_partial(const uint8_t *p, size_t n_bytes) {
    fe127 m;
    m.lo = load_le64(p, n_bytes < 8 ? n_bytes : 8);
    m.hi = n_bytes > 8 ? load_le64(p + 8, n_bytes - 8) : 0;
    return m;
}

/* Horner state after the first LANES * G full blocks at data (G >= 1), from state 0.
 *
 * Horner from h = 0 over blocks b_0 .. b_{N-1} (N = LANES * G) gives
 * sum_k b_k r^(N - k). Lane j runs Horner without the final multiply, with key r^LANES,
 * over b_j, b_{j+LANES}, ...: B_j = sum_g b_{j + LANES g} r^(LANES (G - 1 - g)). Block
 * k = j + LANES g needs r^(N - k) = r^(LANES (G - 1 - g)) r^(LANES - j), so the state is
 * sum_j B_j r^(LANES - j). pw[i] = r^(i + 1), fully reduced. */
static fe127 poly127_bulk(const uint8_t *data, size_t groups, const fe127 *pw) {
    fe127 acc[LANES], h;
    const fe127 rl = pw[LANES - 1];
    size_t g;
    unsigned j;
    for (j = 0; j < LANES; ++j) acc[j] = load_block(data + j * BLOCK_BYTES);
    for (g = 1; g < groups; ++g) {
        const uint8_t *p = data + g * LANES * BLOCK_BYTES;
        for (j = 0; j < LANES; ++j) acc[j] = add_small(mulmod(acc[j], rl), load_block(p + j * BLOCK_BYTES));
    }
    h.lo = h.hi = 0;
    for (j = 0; j < LANES; ++j) h = addmod(h, reduce_full(mulmod(acc[j], pw[LANES - 1 - j])));
    return h;
}

int qnetem_poly127_hash(const uint8_t *data, size_t n, uint64_t r_lo, uint64_t r_hi, uint64_t length,
                        uint64_t *out) {
    fe127 r, h, len_block, pw[LANES];
    size_t off = 0, groups;
    unsigned i;
    if (out == NULL || (n > 0 && data == NULL)) return QNETEM_ERR_NULL;
    /* r < p = 2^127 - 1 */
    if (r_hi > MASK63 || (r_hi == MASK63 && r_lo == ~0ull)) return QNETEM_ERR_ARG;
    r.lo = r_lo;
    r.hi = r_hi;
    h.lo = h.hi = 0;

    groups = n / (LANES * BLOCK_BYTES);
    if (groups >= 2) { /* below that, the lane set-up costs more than it saves */
        pw[0] = r;
        for (i = 1; i < LANES; ++i) pw[i] = reduce_full(mulmod(pw[i - 1], r));
        h = poly127_bulk(data, groups, pw);
        off = groups * LANES * BLOCK_BYTES;
    }
    for (; off + BLOCK_BYTES <= n; off += BLOCK_BYTES) h = mulmod(add_small(h, load_block(data + off)), r);
    if (off < n) h = mulmod(add_small(h, load_partial(data + off, n - off)), r);
    len_block.lo = length;
    len_block.hi = 0;
    h = reduce_full(mulmod(add_small(h, len_block), r));
    out[0] = h.lo;
    out[1] = h.hi;
    return QNETEM_OK;
}
