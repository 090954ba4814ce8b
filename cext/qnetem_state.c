/*
 * qnetem_state.c - density-matrix kernels (gates, Kraus channels, measurement, partial
 * trace, tensor product, Bell fidelities). See qnetem.h for the storage convention.
 *
 * Index arithmetic. Qubit q sits on bit b = n-1-q of a basis index. The indices whose
 * target bits are all 0 ("group bases") are enumerated either by splitting the index
 * range into runs between target bits (1-qubit case) or by inserting zero bits into a
 * compact counter (insert_zero). The members of a group differ only in the target bits,
 * so the 2x2 (or 4x4) block rho[group_r, group_c] is closed under an operator on the
 * target qubit(s): M -> U M U^dagger touches only that block (the register operator is
 * U (x) I up to a permutation of tensor factors; Nielsen & Chuang, 10th anniv. ed., 2.1.7).
 *
 * Free qubits of a reduction (partial trace, reduced 1- and 2-qubit states) are
 * enumerated as submasks t of a mask in increasing order with t <- (t - mask) & mask
 * (Knuth, TAOCP vol. 4A, section 7.1.3); since that order is the order of the
 * compressed index, kept qubits keep their order for free.
 *
 * Complex arithmetic is written out on (re, im) pairs instead of C99 _Complex so that no
 * call to __muldc3 (C99 Annex G inf/NaN recovery) lands in the inner loops.
 */
#include "qnetem.h"

typedef qnetem_c128 cplx;

static const double QNETEM_SQRT1_2 = 0.70710678118654752440;

static inline cplx c_make(double re, double im) {
    cplx z;
    z.re = re;
    z.im = im;
    return z;
}
static inline cplx c_add(cplx a, cplx b) { return c_make(a.re + b.re, a.im + b.im); }
static inline cplx c_mul(cplx a, cplx b) {
    return c_make(a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re);
}
static inline cplx c_conj(cplx a) { return c_make(a.re, -a.im); }
static inline cplx c_scale(cplx a, double s) { return c_make(a.re * s, a.im * s); }

/* Insert a 0 bit at position `pos` of i (bits >= pos move up by one). */
static inline size_t insert_zero(size_t i, unsigned pos) {
    size_t low = i & (((size_t)1 << pos) - 1u);
    return ((i >> pos) << (pos + 1u)) | low;
}

static int check_register(const void *rho, int n_qubits) {
    if (rho == NULL) return QNETEM_ERR_NULL;
    if (n_qubits < 1 || n_qubits > QNETEM_MAX_QUBITS) return QNETEM_ERR_QUBITS;
    return QNETEM_OK;
}

static int check_qubit(int n_qubits, int qubit) {
    return (qubit < 0 || qubit >= n_qubits) ? QNETEM_ERR_QUBIT : QNETEM_OK;
}

/* Eigenvector of outcome `outcome` (0 = +1 eigenvalue) in `basis`: |0>,|1>; |+>,|->; |+i>,|-i>. */
static int basis_vector(int basis, int outcome, cplx e[2]) {
    double s = QNETEM_SQRT1_2;
    switch (basis) {
    case QNETEM_BASIS_Z:
        e[0] = c_make(outcome ? 0.0 : 1.0, 0.0);
        e[1] = c_make(outcome ? 1.0 : 0.0, 0.0);
        return QNETEM_OK;
    case QNETEM_BASIS_X:
        e[0] = c_make(s, 0.0);
        e[1] = c_make(outcome ? -s : s, 0.0);
        return QNETEM_OK;
    case QNETEM_BASIS_Y:
        e[0] = c_make(s, 0.0);
        e[1] = c_make(0.0, outcome ? -s : s);
        return QNETEM_OK;
    default:
        return QNETEM_ERR_BASIS;
    }
}

/* ---------------------------------------------------------------- 1-qubit operators -- */

/* Shared driver: for every 2x2 block of `qubit`, M <- sum_k K_k M K_k^dagger. */
static void kraus_blocks_1q(cplx *rho, int n_qubits, int qubit, const cplx *ops, int n_ops) {
    const size_t d = (size_t)1 << n_qubits;
    const size_t m = (size_t)1 << (unsigned)(n_qubits - 1 - qubit);
    size_t rh, rl, ch, cl;
    int k;
    for (rh = 0; rh < d; rh += 2 * m) {
        for (rl = 0; rl < m; ++rl) {
            cplx *row0 = rho + (rh + rl) * d;
            cplx *row1 = row0 + m * d;
            for (ch = 0; ch < d; ch += 2 * m) {
                for (cl = 0; cl < m; ++cl) {
                    const size_t c0 = ch + cl, c1 = c0 + m;
                    const cplx m00 = row0[c0], m01 = row0[c1], m10 = row1[c0], m11 = row1[c1];
                    cplx a00 = c_make(0, 0), a01 = a00, a10 = a00, a11 = a00;
                    for (k = 0; k < n_ops; ++k) {
                        const cplx *u = ops + 4 * k;
                        /* T = K M */
                        const cplx t00 = c_add(c_mul(u[0], m00), c_mul(u[1], m10));
                        const cplx t01 = c_add(c_mul(u[0], m01), c_mul(u[1], m11));
                        const cplx t10 = c_add(c_mul(u[2], m00), c_mul(u[3], m10));
                        const cplx t11 = c_add(c_mul(u[2], m01), c_mul(u[3], m11));
                        /* (T K^dagger)_ij = sum_l T_il conj(K_jl) */
                        const cplx k00 = c_conj(u[0]), k01 = c_conj(u[1]);
                        const cplx k10 = c_conj(u[2]), k11 = c_conj(u[3]);
                        a00 = c_add(a00, c_add(c_mul(t00, k00), c_mul(t01, k01)));
                        a01 = c_add(a01, c_add(c_mul(t00, k10), c_mul(t01, k11)));
                        a10 = c_add(a10, c_add(c_mul(t10, k00), c_mul(t11, k01)));
                        a11 = c_add(a11, c_add(c_mul(t10, k10), c_mul(t11, k11)));
                    }
                    row0[c0] = a00;
                    row0[c1] = a01;
                    row1[c0] = a10;
                    row1[c1] = a11;
                }
            }
        }
    }
}

int qnetem_apply_1q(qnetem_c128 *rho, int n_qubits, int qubit, const qnetem_c128 *u) {
    int rc = check_register(rho, n_qubits);
    if (rc) return rc;
    if (u == NULL) return QNETEM_ERR_NULL;
    if ((rc = check_qubit(n_qubits, qubit))) return rc;
    kraus_blocks_1q(rho, n_qubits, qubit, u, 1);
    return QNETEM_OK;
}

int qnetem_apply_kraus_1q(qnetem_c128 *rho, int n_qubits, int qubit,
                          const qnetem_c128 *kraus, int n_kraus) {
    int rc = check_register(rho, n_qubits);
    if (rc) return rc;
    if (kraus == NULL) return QNETEM_ERR_NULL;
    if ((rc = check_qubit(n_qubits, qubit))) return rc;
    if (n_kraus < 1) return QNETEM_ERR_ARG;
    kraus_blocks_1q(rho, n_qubits, qubit, kraus, n_kraus);
    return QNETEM_OK;
}

/* ---------------------------------------------------------------- 2-qubit operators -- */

int qnetem_apply_2q(qnetem_c128 *rho, int n_qubits, int qubit_a, int qubit_b,
                    const qnetem_c128 *u) {
    int rc = check_register(rho, n_qubits);
    size_t d, ma, mb, off[4], quarter, gi, gj;
    unsigned lo_pos, hi_pos;
    cplx ud[16]; /* U^dagger, row-major */
    int i, j, k;
    if (rc) return rc;
    if (u == NULL) return QNETEM_ERR_NULL;
    if ((rc = check_qubit(n_qubits, qubit_a)) || (rc = check_qubit(n_qubits, qubit_b))) return rc;
    if (qubit_a == qubit_b) return QNETEM_ERR_SAME_QUBIT;

    d = (size_t)1 << n_qubits;
    ma = (size_t)1 << (unsigned)(n_qubits - 1 - qubit_a);
    mb = (size_t)1 << (unsigned)(n_qubits - 1 - qubit_b);
    /* Index k of U is 2*bit_a + bit_b. */
    off[0] = 0;
    off[1] = mb;
    off[2] = ma;
    off[3] = ma | mb;
    lo_pos = (unsigned)(n_qubits - 1 - (qubit_a > qubit_b ? qubit_a : qubit_b));
    hi_pos = (unsigned)(n_qubits - 1 - (qubit_a > qubit_b ? qubit_b : qubit_a));
    quarter = d >> 2;
    for (i = 0; i < 4; ++i)
        for (j = 0; j < 4; ++j) ud[4 * i + j] = c_conj(u[4 * j + i]);

    for (gi = 0; gi < quarter; ++gi) {
        const size_t rbase = insert_zero(insert_zero(gi, lo_pos), hi_pos);
        cplx *rows[4];
        for (i = 0; i < 4; ++i) rows[i] = rho + (rbase + off[i]) * d;
        for (gj = 0; gj < quarter; ++gj) {
            const size_t cbase = insert_zero(insert_zero(gj, lo_pos), hi_pos);
            cplx mblk[16], t[16];
            for (i = 0; i < 4; ++i)
                for (j = 0; j < 4; ++j) mblk[4 * i + j] = rows[i][cbase + off[j]];
            /* T = U M */
            for (i = 0; i < 4; ++i)
                for (j = 0; j < 4; ++j) {
                    cplx acc = c_mul(u[4 * i], mblk[j]);
                    for (k = 1; k < 4; ++k) acc = c_add(acc, c_mul(u[4 * i + k], mblk[4 * k + j]));
                    t[4 * i + j] = acc;
                }
            /* M' = T U^dagger */
            for (i = 0; i < 4; ++i)
                for (j = 0; j < 4; ++j) {
                    cplx acc = c_mul(t[4 * i], ud[j]);
                    for (k = 1; k < 4; ++k) acc = c_add(acc, c_mul(t[4 * i + k], ud[4 * k + j]));
                    rows[i][cbase + off[j]] = acc;
                }
        }
    }
    return QNETEM_OK;
}

/* ---------------------------------------------------------------------- measurement -- */

/* Reduced 2x2 state of `qubit`: red[2*i+j] = sum_t rho[t + i*m, t + j*m]. */
static void reduced_1q(const cplx *rho, int n_qubits, int qubit, cplx red[4]) {
    const size_t d = (size_t)1 << n_qubits;
    const size_t m = (size_t)1 << (unsigned)(n_qubits - 1 - qubit);
    const size_t free_mask = (d - 1) & ~m;
    size_t t = 0;
    cplx r00 = c_make(0, 0), r01 = r00, r10 = r00, r11 = r00;
    do {
        const cplx *row0 = rho + t * d, *row1 = rho + (t + m) * d;
        r00 = c_add(r00, row0[t]);
        r01 = c_add(r01, row0[t + m]);
        r10 = c_add(r10, row1[t]);
        r11 = c_add(r11, row1[t + m]);
        t = (t - free_mask) & free_mask;
    } while (t != 0);
    red[0] = r00;
    red[1] = r01;
    red[2] = r10;
    red[3] = r11;
}

/* Re <e| red |e> */
static double expectation(const cplx red[4], const cplx e[2]) {
    cplx acc = c_make(0, 0);
    int i, j;
    for (i = 0; i < 2; ++i)
        for (j = 0; j < 2; ++j) acc = c_add(acc, c_mul(c_mul(c_conj(e[i]), red[2 * i + j]), e[j]));
    return acc.re;
}

static double clamp01(double p) {
    if (!(p >= 0.0)) return 0.0; /* also maps NaN to 0 */
    return p > 1.0 ? 1.0 : p;
}

int qnetem_probability(const qnetem_c128 *rho, int n_qubits, int qubit, int basis,
                       double *p0_out) {
    int rc = check_register(rho, n_qubits);
    cplx red[4], e[2];
    if (rc) return rc;
    if (p0_out == NULL) return QNETEM_ERR_NULL;
    if ((rc = check_qubit(n_qubits, qubit))) return rc;
    if ((rc = basis_vector(basis, 0, e))) return rc;
    reduced_1q(rho, n_qubits, qubit, red);
    *p0_out = clamp01(expectation(red, e));
    return QNETEM_OK;
}

/* Draw the outcome of measuring `qubit` in `basis` with draw r: *outcome_out, the
 * probability it was drawn with (*prob_out), the weight actually projected out (*weight_out)
 * and its eigenvector e. Reads rho only. */
static int measure_decide(const cplx *rho, int n_qubits, int qubit, int basis, double r,
                          int *outcome_out, double *prob_out, double *weight_out, cplx e[2]) {
    cplx red[4];
    double p0, weight;
    int outcome, rc;
    if (!(r >= 0.0 && r < 1.0)) return QNETEM_ERR_ARG;
    if ((rc = basis_vector(basis, 0, e))) return rc;
    reduced_1q(rho, n_qubits, qubit, red);
    p0 = clamp01(expectation(red, e));
    outcome = (r < p0) ? 0 : 1;
    if (outcome) basis_vector(basis, 1, e);
    /* Renormalise by the weight actually projected out, so the trace is exactly 1 even
     * when rho's trace drifted by rounding; the reported probability is the one the
     * outcome was drawn with. */
    weight = expectation(red, e);
    if (!(weight > 0.0)) return QNETEM_ERR_ZERO_PROB;
    *outcome_out = outcome;
    *prob_out = outcome ? 1.0 - p0 : p0;
    *weight_out = weight;
    return QNETEM_OK;
}

/* Post-measurement state (Nielsen & Chuang section 2.4.1, projective case):
 * rho' = P rho P / w with P = |e><e| (x) I. Blockwise: M -> |e> <e|M|e> <e| / w. */
static void measure_collapse(cplx *rho, int n_qubits, int qubit, const cplx e[2], double weight) {
    const size_t d = (size_t)1 << n_qubits;
    const size_t m = (size_t)1 << (unsigned)(n_qubits - 1 - qubit);
    const double inv_w = 1.0 / weight;
    const cplx ce0 = c_conj(e[0]), ce1 = c_conj(e[1]);
    cplx proj[4];
    size_t rh, rl, ch, cl;
    int i, j;
    for (i = 0; i < 2; ++i)
        for (j = 0; j < 2; ++j) proj[2 * i + j] = c_mul(e[i], c_conj(e[j]));
    for (rh = 0; rh < d; rh += 2 * m) {
        for (rl = 0; rl < m; ++rl) {
            cplx *row0 = rho + (rh + rl) * d;
            cplx *row1 = row0 + m * d;
            for (ch = 0; ch < d; ch += 2 * m) {
                for (cl = 0; cl < m; ++cl) {
                    const size_t c0 = ch + cl, c1 = c0 + m;
                    /* s = <e| M |e> / w */
                    const cplx v0 = c_add(c_mul(row0[c0], e[0]), c_mul(row0[c1], e[1]));
                    const cplx v1 = c_add(c_mul(row1[c0], e[0]), c_mul(row1[c1], e[1]));
                    const cplx s = c_scale(c_add(c_mul(ce0, v0), c_mul(ce1, v1)), inv_w);
                    row0[c0] = c_mul(proj[0], s);
                    row0[c1] = c_mul(proj[1], s);
                    row1[c0] = c_mul(proj[2], s);
                    row1[c1] = c_mul(proj[3], s);
                }
            }
        }
    }
}

int qnetem_measure(qnetem_c128 *rho, int n_qubits, int qubit, int basis, double r,
                   int *outcome_out, double *prob_out) {
    int rc = check_register(rho, n_qubits);
    cplx e[2];
    double weight;
    if (rc) return rc;
    if (outcome_out == NULL || prob_out == NULL) return QNETEM_ERR_NULL;
    if ((rc = check_qubit(n_qubits, qubit))) return rc;
    if ((rc = measure_decide(rho, n_qubits, qubit, basis, r, outcome_out, prob_out, &weight, e)))
        return rc;
    measure_collapse(rho, n_qubits, qubit, e, weight);
    return QNETEM_OK;
}

/* --------------------------------------------------------------- reductions, tensor -- */

/* out <- Tr over the qubits whose bits are set in rm_mask (arguments already checked). */
static void trace_out_mask(const cplx *rho, int n_qubits, size_t rm_mask, cplx *out) {
    const size_t d = (size_t)1 << n_qubits;
    const size_t keep_mask = (d - 1) & ~rm_mask;
    size_t n_kept_bits = 0, bits, dk, oi, ri;
    for (bits = keep_mask; bits; bits &= bits - 1) ++n_kept_bits;
    dk = (size_t)1 << n_kept_bits;

    /* out[i, j] = sum_t rho[keep(i) | t, keep(j) | t] (Nielsen & Chuang section 2.4.3). */
    oi = 0;
    ri = 0;
    do {
        size_t oj = 0, cj = 0;
        do {
            cplx acc = c_make(0, 0);
            size_t t = 0;
            do {
                acc = c_add(acc, rho[(ri | t) * d + (cj | t)]);
                t = (t - rm_mask) & rm_mask;
            } while (t != 0);
            out[oi * dk + oj] = acc;
            ++oj;
            cj = (cj - keep_mask) & keep_mask;
        } while (cj != 0);
        ++oi;
        ri = (ri - keep_mask) & keep_mask;
    } while (ri != 0);
}

int qnetem_partial_trace(const qnetem_c128 *rho, int n_qubits, const int *remove,
                         int n_remove, qnetem_c128 *out) {
    int rc = check_register(rho, n_qubits);
    size_t rm_mask = 0;
    int i;
    if (rc) return rc;
    if (out == NULL || (n_remove > 0 && remove == NULL)) return QNETEM_ERR_NULL;
    if (n_remove < 0 || n_remove > n_qubits) return QNETEM_ERR_ARG;
    for (i = 0; i < n_remove; ++i) {
        size_t bit;
        if ((rc = check_qubit(n_qubits, remove[i]))) return rc;
        bit = (size_t)1 << (unsigned)(n_qubits - 1 - remove[i]);
        if (rm_mask & bit) return QNETEM_ERR_SAME_QUBIT;
        rm_mask |= bit;
    }
    trace_out_mask(rho, n_qubits, rm_mask, out);
    return QNETEM_OK;
}

int qnetem_measure_batch(qnetem_c128 *rhos, int n_qubits, int count, const int *qubits,
                         const int *bases, const double *rs, int *outcomes_out,
                         double *probs_out, qnetem_c128 *rest_out) {
    int rc = check_register(rhos, n_qubits);
    size_t d2, rest_d2;
    double weight;
    cplx e[2];
    int i;
    if (rc) return rc;
    if (qubits == NULL || bases == NULL || rs == NULL || outcomes_out == NULL || probs_out == NULL)
        return QNETEM_ERR_NULL;
    if (count < 0 || (rest_out != NULL && n_qubits < 2)) return QNETEM_ERR_ARG;
    d2 = (size_t)1 << (2u * (unsigned)n_qubits);
    rest_d2 = d2 >> 2;
    /* Phase 1: decide every outcome, writing no register (all-or-nothing on error). */
    for (i = 0; i < count; ++i) {
        if ((rc = check_qubit(n_qubits, qubits[i]))) return rc;
        if ((rc = measure_decide(rhos + (size_t)i * d2, n_qubits, qubits[i], bases[i], rs[i],
                                 &outcomes_out[i], &probs_out[i], &weight, e)))
            return rc;
    }
    /* Phase 2: the same decision again (a pure function of the unchanged rho), then the
     * same collapse and partial trace as qnetem_measure + qnetem_partial_trace. */
    for (i = 0; i < count; ++i) {
        cplx *rho = rhos + (size_t)i * d2;
        int outcome;
        double prob;
        measure_decide(rho, n_qubits, qubits[i], bases[i], rs[i], &outcome, &prob, &weight, e);
        measure_collapse(rho, n_qubits, qubits[i], e, weight);
        if (rest_out != NULL)
            trace_out_mask(rho, n_qubits, (size_t)1 << (unsigned)(n_qubits - 1 - qubits[i]),
                           rest_out + (size_t)i * rest_d2);
    }
    return QNETEM_OK;
}

int qnetem_tensor(const qnetem_c128 *a, int n_a, const qnetem_c128 *b, int n_b,
                  qnetem_c128 *out) {
    int rc;
    size_t da, db, dt, ia, ib, ja, jb;
    if ((rc = check_register(a, n_a)) || (rc = check_register(b, n_b))) return rc;
    if (out == NULL) return QNETEM_ERR_NULL;
    if (n_a + n_b > QNETEM_MAX_QUBITS) return QNETEM_ERR_QUBITS;
    da = (size_t)1 << n_a;
    db = (size_t)1 << n_b;
    dt = da * db;
    for (ia = 0; ia < da; ++ia)
        for (ib = 0; ib < db; ++ib) {
            cplx *orow = out + (ia * db + ib) * dt;
            const cplx *brow = b + ib * db;
            for (ja = 0; ja < da; ++ja) {
                const cplx av = a[ia * da + ja];
                cplx *o = orow + ja * db;
                for (jb = 0; jb < db; ++jb) o[jb] = c_mul(av, brow[jb]);
            }
        }
    return QNETEM_OK;
}

int qnetem_bell_fidelities(const qnetem_c128 *rho, int n_qubits, int qubit_a, int qubit_b,
                           double *out) {
    int rc = check_register(rho, n_qubits);
    size_t d, ma, mb, free_mask, t;
    cplx s00_00, s11_11, s00_11, s11_00, s01_01, s10_10, s01_10, s10_01;
    if (rc) return rc;
    if (out == NULL) return QNETEM_ERR_NULL;
    if ((rc = check_qubit(n_qubits, qubit_a)) || (rc = check_qubit(n_qubits, qubit_b))) return rc;
    if (qubit_a == qubit_b) return QNETEM_ERR_SAME_QUBIT;
    d = (size_t)1 << n_qubits;
    ma = (size_t)1 << (unsigned)(n_qubits - 1 - qubit_a);
    mb = (size_t)1 << (unsigned)(n_qubits - 1 - qubit_b);
    free_mask = (d - 1) & ~(ma | mb);
    s00_00 = c_make(0, 0);
    s11_11 = s00_11 = s11_00 = s01_01 = s10_10 = s01_10 = s10_01 = s00_00;
    /* Only the 8 elements of the reduced state (a, b) that the Bell projectors see.
     * Index xy means bit_a = x, bit_b = y. */
    t = 0;
    do {
        const size_t i00 = t, i01 = t | mb, i10 = t | ma, i11 = t | ma | mb;
        s00_00 = c_add(s00_00, rho[i00 * d + i00]);
        s11_11 = c_add(s11_11, rho[i11 * d + i11]);
        s00_11 = c_add(s00_11, rho[i00 * d + i11]);
        s11_00 = c_add(s11_00, rho[i11 * d + i00]);
        s01_01 = c_add(s01_01, rho[i01 * d + i01]);
        s10_10 = c_add(s10_10, rho[i10 * d + i10]);
        s01_10 = c_add(s01_10, rho[i01 * d + i10]);
        s10_01 = c_add(s10_01, rho[i10 * d + i01]);
        t = (t - free_mask) & free_mask;
    } while (t != 0);
    /* Phi+- = (|00> +- |11>)/sqrt2, Psi+- = (|01> +- |10>)/sqrt2 (Nielsen & Chuang section 1.3.6):
     * <B|rho|B> = (rho_xx + rho_yy +- (rho_xy + rho_yx)) / 2, real part. */
    out[0] = 0.5 * (s00_00.re + s11_11.re + (s00_11.re + s11_00.re));
    out[1] = 0.5 * (s00_00.re + s11_11.re - (s00_11.re + s11_00.re));
    out[2] = 0.5 * (s01_01.re + s10_10.re + (s01_10.re + s10_01.re));
    out[3] = 0.5 * (s01_01.re + s10_10.re - (s01_10.re + s10_01.re));
    return QNETEM_OK;
}
