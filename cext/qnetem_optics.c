/*
 * qnetem_optics.c - optical layer of decoy-state BB84: Alice's per-pulse choices and the
 * detections at Bob, sampled at a cost proportional to the detections, not the pulses.
 *
 * The model and the probability tables are described and computed in
 * emulator/kernels/_optics.py (weak coherent pulses with Poisson photon numbers, Ma, Qi,
 * Zhao & Lo, PRA 72, 012326 (2005) Sec. II; decoy states, Lo, Ma & Chen, PRL 94, 230504
 * (2005)); this file only draws uniforms and compares them with the tables, plus one
 * logarithm per geometric gap, so that the numpy twin (emulator/kernels/_optics_numpy.py)
 * reproduces it bit for bit.
 *
 * Random numbers: every draw is a half (lo = x0 | x1 << 32, hi = x2 | x3 << 32) of one
 * Philox4x32-10 block addressed by (key, stream, index), never a sequential state
 * (lo is what qnetem_rng_u64 returns for sample `index` of (key, stream)):
 *   Alice's choices      alice_key,   stream 0, index = pulse, lo
 *   gap of ordinal j     channel_key, stream 1, index = j >> 1, lo if j is even else hi
 *   accept / intercept   channel_key, stream 2, index = pulse, unit53(lo) / unit53(hi)
 *   entry / pattern      channel_key, stream 3, index = pulse, unit53(lo) / unit53(hi)
 *   bits                 channel_key, stream 4, index = pulse, lo: Bob's basis Z iff
 *                        ((lo >> 32) & 0x7FFFFFFF) < bob_basis_z; Eve's basis lo & 1,
 *                        her random bit (lo >> 1) & 1, the double-click bit (lo >> 2) & 1
 * unit53(w) = (w >> 11) 2^-53 in [0, 1); open53(w) = ((w >> 11) + 1) 2^-53 in (0, 1].
 *
 * Why the accepted pulses have exactly the model's click probabilities
 * ---------------------------------------------------------------------
 * Let P(i) be the click probability of pulse i (it depends on i only through its kind:
 * Alice's intensity class and whether Eve intercepts it) and p_max >= P(i) for every kind.
 * 1. Candidates. Starting at position s, the gap g = floor(log(u) / log(1 - p_max)) with
 *    u uniform on (0, 1] has P(g >= k) = P(u <= (1 - p_max)^k) = (1 - p_max)^k: g is the
 *    number of failures before the first success of independent Bernoulli(p_max) trials.
 *    Chaining gaps from fresh, independent draws (s <- candidate + 1) therefore makes
 *    "pulse i is a candidate" an independent Bernoulli(p_max) event for every pulse i (the
 *    geometric waiting-time characterisation of a Bernoulli process).
 * 2. Thinning. Candidate i is kept when an independent uniform v_i < P(i) / p_max. The
 *    kind of pulse i and v_i come from other streams and depend on i alone, so they are
 *    independent of the candidate process; hence P(i kept) = p_max * P(i) / p_max = P(i),
 *    independently across pulses — exactly the per-pulse Bernoulli model.
 * 3. Details. Given that pulse i clicks, its photon number, what reaches Bob, his basis,
 *    Eve's basis and bit and the detector pattern are drawn from their distribution
 *    conditioned on the click: the table entry from P(entry | click) = weight / P(kind),
 *    Bob's and Eve's choices unconditionally (the click probability does not depend on
 *    them), and the pattern from P(pattern | entry, click). The joint law of (click,
 *    details) is therefore the model's.
 * 4. Dead time. A detector that is blind at pulse i does not click there and a blind
 *    pulse does not extend the dead time (non-paralysable), so the registered clicks are
 *    the Bernoulli clicks with those inside [c+1, c+dead_slots] of a registered click c
 *    removed: candidates there are discarded whatever their draws say, and by
 *    independence (step 2) the process after the dead window is again the model's.
 * Exactness is limited only by the 2^-53 grid of the uniforms and the rounding of log.
 *
 * Windows: the cursor (ordinal of the next gap draw, position it counts from, end of the
 * dead time) is returned, and a call that stops at `end` leaves the pending draw unused,
 * so consecutive windows give exactly the detections of one call over their union.
 *
 * Speed: one Philox block is a chain of ten dependent multiplies, so the sampler works in
 * stages over batches of up to BATCH candidates — gap draws, candidate positions, Alice's
 * and the acceptance draws of every candidate, thinning and dead time (the only
 * sequential part), then the detail draws of the kept ones — and evaluates the blocks of
 * a stage eight at a time, which the compiler turns into vector code. The stage order is
 * invisible in the result: every draw is addressed by (stream, index).
 */
#include <math.h>

#include "qnetem.h"

#define STREAM_CHOICE 0u
#define STREAM_GAP 1u
#define STREAM_CANDIDATE 2u
#define STREAM_DETAIL 3u
#define STREAM_BITS 4u

#define N_KINDS 9
#define MAX_INDEX (UINT64_C(1) << 53)
#define BATCH 256
#define LANES 8

/* EveFlag bits (emulator/kernels/_optics.py). */
#define EVE_INTERCEPTED 1u
#define EVE_BASIS_MATCHED 2u

/* On x86-64 ELF (GCC, Clang) the entry points are compiled for x86-64-v4 (AVX-512),
 * x86-64-v3 (AVX2) and the baseline, and the loader picks the best the CPU has (ifunc).
 * Integer results are the same on every path, and floating-point expressions are not
 * contracted into FMAs (ISO C mode: -std=c99 implies -ffp-contract=off), so every path
 * gives the same detections. */
#if defined(__x86_64__) && defined(__ELF__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define QNETEM_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef QNETEM_MULTIVERSION
#define QNETEM_MULTIVERSION
#endif

/* Philox4x32-10 blocks (Salmon et al., SC'11, section 3.2; constants of Random123's
 * philox.h), the function of qnetem_rng.c: the block at counter (index lo, index hi,
 * stream lo, stream hi) under key (key lo, key hi); lo[j] = x0 | x1 << 32 (qnetem_rng_u64's
 * sample index[j] of (key, stream)), hi[j] = x2 | x3 << 32. 32-bit words are held in 64-bit
 * lanes so that the products are widening 32x32 multiplies, which compilers vectorise.
 * tests/unit/test_optics.py checks both halves against the reference block function. */
static inline void philox_blocks(uint64_t key, uint64_t stream, const uint64_t *index, size_t n,
                                 uint64_t *lo, uint64_t *hi) {
    size_t b;
    for (b = 0; b < n; b += LANES) {
        uint64_t c0[LANES], c1[LANES], c2[LANES], c3[LANES];
        uint64_t k0 = key & 0xFFFFFFFFu, k1 = key >> 32;
        const size_t m = n - b < LANES ? n - b : LANES;
        int l, round;
        for (l = 0; l < LANES; ++l) {
            const uint64_t i = index[b + ((size_t)l < m ? (size_t)l : 0)];
            c0[l] = i & 0xFFFFFFFFu;
            c1[l] = i >> 32;
            c2[l] = stream & 0xFFFFFFFFu;
            c3[l] = stream >> 32;
        }
        for (round = 0; round < 10; ++round) {
            for (l = 0; l < LANES; ++l) {
                const uint64_t p0 = UINT64_C(0xD2511F53) * c0[l];
                const uint64_t p1 = UINT64_C(0xCD9E8D57) * c2[l];
                const uint64_t n0 = (p1 >> 32) ^ c1[l] ^ k0;
                const uint64_t n2 = (p0 >> 32) ^ c3[l] ^ k1;
                c1[l] = p1 & 0xFFFFFFFFu;
                c3[l] = p0 & 0xFFFFFFFFu;
                c0[l] = n0;
                c2[l] = n2;
            }
            k0 = (k0 + 0x9E3779B9u) & 0xFFFFFFFFu;
            k1 = (k1 + 0xBB67AE85u) & 0xFFFFFFFFu;
        }
        for (l = 0; (size_t)l < m; ++l) {
            lo[b + (size_t)l] = c0[l] | (c1[l] << 32);
            if (hi) hi[b + (size_t)l] = c2[l] | (c3[l] << 32);
        }
    }
}

static inline double unit53(uint64_t w) { return (double)(w >> 11) * 0x1.0p-53; }

static inline double open53(uint64_t w) { return (double)((w >> 11) + 1) * 0x1.0p-53; }

static inline void decode_choice(const qnetem_optics_choice *t, uint64_t u, uint8_t *cls,
                                 uint8_t *basis, uint8_t *bit) {
    const uint64_t hi = u >> 32;
    *cls = (uint8_t)(hi < t->signal ? 0 : (hi < t->signal_or_decoy ? 1 : 2));
    *basis = (uint8_t)((((u >> 1) & UINT64_C(0x7FFFFFFF)) < t->basis_z) ? 0 : 1);
    *bit = (uint8_t)(u & 1u);
}

QNETEM_MULTIVERSION
int qnetem_optics_choices(uint64_t alice_key, const uint64_t *indices, size_t count,
                          const qnetem_optics_choice *thresholds, uint8_t *cls,
                          uint8_t *basis, uint8_t *bit) {
    uint64_t u[BATCH];
    size_t b, j;
    if (count == 0) return QNETEM_OK;
    if (!indices || !thresholds || !cls || !basis || !bit) return QNETEM_ERR_NULL;
    for (b = 0; b < count; b += BATCH) {
        const size_t n = count - b < BATCH ? count - b : BATCH;
        philox_blocks(alice_key, STREAM_CHOICE, indices + b, n, u, NULL);
        for (j = 0; j < n; ++j) decode_choice(thresholds, u[j], &cls[b + j], &basis[b + j], &bit[b + j]);
    }
    return QNETEM_OK;
}

static int check_model(const qnetem_optics_model *m) {
    int k;
    if (m->kind_start[0] != 0 || m->kind_start[N_KINDS] != m->n_entries) return QNETEM_ERR_ARG;
    for (k = 0; k < N_KINDS; ++k) {
        if (m->kind_start[k] > m->kind_start[k + 1]) return QNETEM_ERR_ARG;
        if (m->accept[k] > 0.0 && m->kind_start[k] == m->kind_start[k + 1]) return QNETEM_ERR_ARG;
    }
    if (m->n_entries && (!m->entry_cdf || !m->entry_photons || !m->entry_flags || !m->entry_pattern))
        return QNETEM_ERR_NULL;
    if (m->has_candidates && !(m->log1m_p_max < 0.0)) return QNETEM_ERR_ARG;
    return QNETEM_OK;
}

/* Candidates of the gap draws of ordinals `ordinal` .. + BATCH - 1 counted from s, up to
 * the first one at or beyond end; returns their number (BATCH when none reached end). */
static inline size_t candidates(const qnetem_optics_model *m, uint64_t ordinal, uint64_t s, uint64_t end,
                         uint64_t *cand) {
    uint64_t blocks[BATCH / 2 + 1], lo[BATCH / 2 + 1], hi[BATCH / 2 + 1];
    const uint64_t first = ordinal >> 1;
    const size_t n_blocks = (size_t)(((ordinal + BATCH - 1) >> 1) - first + 1);
    size_t j, n;
    for (j = 0; j < n_blocks; ++j) blocks[j] = first + j;
    philox_blocks(m->channel_key, STREAM_GAP, blocks, n_blocks, lo, hi);
    for (n = 0; n < BATCH && s < end; ++n) {
        const uint64_t o = ordinal + n, w = (o & 1u) ? hi[(o >> 1) - first] : lo[(o >> 1) - first];
        const double g = floor(log(open53(w)) / m->log1m_p_max);
        if (!(g < (double)(end - s))) break; /* at or beyond end: this draw stays unused */
        cand[n] = s + (uint64_t)g;
        s = cand[n] + 1;
    }
    return n;
}

QNETEM_MULTIVERSION
int qnetem_optics_sample(const qnetem_optics_model *m, qnetem_optics_cursor *cursor,
                         uint64_t end, size_t capacity, const qnetem_optics_out *out,
                         size_t *count_out) {
    uint64_t ordinal, s, dead;
    uint64_t cand[BATCH], ua[BATCH], acc_lo[BATCH], acc_hi[BATCH];
    uint64_t kpos[BATCH], det_lo[BATCH], det_hi[BATCH], bits[BATCH];
    uint8_t kcls[BATCH], kbasis[BATCH], kbit[BATCH];
    int kkind[BATCH];
    size_t count = 0;
    int rc;
    if (!m || !cursor || !out || !count_out) return QNETEM_ERR_NULL;
    if (capacity && (!out->pulse || !out->bob_basis || !out->outcome || !out->double_click ||
                     !out->photons || !out->alice_class || !out->alice_basis ||
                     !out->alice_bit || !out->eve))
        return QNETEM_ERR_NULL;
    if (end > MAX_INDEX || cursor->position > MAX_INDEX) return QNETEM_ERR_ARG;
    if (cursor->ordinal > UINT64_MAX - BATCH) return QNETEM_ERR_ARG;
    rc = check_model(m);
    if (rc) return rc;
    ordinal = cursor->ordinal;
    s = cursor->position;
    dead = cursor->dead_until;
    *count_out = 0;
    if (!m->has_candidates) { /* nothing can click: the window is decided at once */
        if (s < end) s = end;
        cursor->position = s;
        return QNETEM_OK;
    }
    while (count < capacity && s < end) {
        const size_t n = candidates(m, ordinal, s, end, cand);
        size_t i, k, kept = 0, stop = n;
        int full = 0;
        /* Alice's choices and the acceptance / intercept draws of every candidate */
        philox_blocks(m->alice_key, STREAM_CHOICE, cand, n, ua, NULL);
        philox_blocks(m->channel_key, STREAM_CANDIDATE, cand, n, acc_lo, acc_hi);
        /* thinning and dead time, in pulse order */
        for (i = 0; i < n; ++i) {
            const uint64_t c = cand[i];
            uint8_t cls, a_basis, a_bit;
            int mode;
            double acc;
            if (c < dead) continue; /* blind: discarded, dead time not extended */
            decode_choice(&m->choice, ua[i], &cls, &a_basis, &a_bit);
            mode = m->pns ? 2 : 0;
            if (m->intercept_fraction > 0.0 &&
                (m->intercept_fraction >= 1.0 || unit53(acc_hi[i]) < m->intercept_fraction))
                mode = 1;
            acc = m->accept[mode * 3 + cls];
            if (!(acc > 0.0)) continue;
            if (acc < 1.0 && !(unit53(acc_lo[i]) < acc)) continue;
            kpos[kept] = c;
            kcls[kept] = cls;
            kbasis[kept] = a_basis;
            kbit[kept] = a_bit;
            kkind[kept] = mode * 3 + cls;
            ++kept;
            dead = c + 1 + m->dead_slots;
            if (count + kept == capacity) { /* stop right after the capacity-th click */
                stop = i + 1;
                full = 1;
                break;
            }
        }
        /* the details of the kept ones, conditioned on their click */
        philox_blocks(m->channel_key, STREAM_DETAIL, kpos, kept, det_lo, det_hi);
        philox_blocks(m->channel_key, STREAM_BITS, kpos, kept, bits, NULL);
        for (k = 0; k < kept; ++k) {
            const int kind = kkind[k];
            const double ue = unit53(det_lo[k]), up = unit53(det_hi[k]);
            const uint64_t w = bits[k];
            const uint8_t bob = (uint8_t)((((w >> 32) & UINT64_C(0x7FFFFFFF)) < m->bob_basis_z) ? 0 : 1);
            const uint8_t eve_basis = (uint8_t)(w & 1u), eve_bit = (uint8_t)((w >> 1) & 1u);
            const uint8_t squash = (uint8_t)((w >> 2) & 1u);
            uint32_t e = m->kind_start[kind];
            const uint32_t last = m->kind_start[kind + 1] - 1;
            uint8_t flags, beta = kbasis[k], y = kbit[k];
            const double *t;
            int qcase;
            while (e < last && !(ue < m->entry_cdf[e])) ++e;
            flags = m->entry_flags[e];
            if (flags & EVE_INTERCEPTED) { /* the photons carry Eve's result */
                beta = eve_basis;
                if (eve_basis == kbasis[k]) flags |= EVE_BASIS_MATCHED;
                else y = eve_bit;
            }
            qcase = (beta != bob) ? 2 : (int)y;
            t = m->entry_pattern + 6 * (size_t)e + 2 * (size_t)qcase;
            out->pulse[count] = kpos[k];
            out->bob_basis[count] = bob;
            if (up < t[0]) {
                out->outcome[count] = 0;
                out->double_click[count] = 0;
            } else if (up < t[1]) {
                out->outcome[count] = 1;
                out->double_click[count] = 0;
            } else { /* double click: squashed to a random bit */
                out->outcome[count] = squash;
                out->double_click[count] = 1;
            }
            out->photons[count] = m->entry_photons[e];
            out->alice_class[count] = kcls[k];
            out->alice_basis[count] = kbasis[k];
            out->alice_bit[count] = kbit[k];
            out->eve[count] = flags;
            ++count;
        }
        ordinal += stop;
        if (stop) s = cand[stop - 1] + 1;
        if (full || n < BATCH) break; /* capacity reached, or the next gap reaches end */
    }
    cursor->ordinal = ordinal;
    cursor->position = s;
    cursor->dead_until = dead;
    *count_out = count;
    return QNETEM_OK;
}
