/*
 * qnetem.h - C99 state kernels of qnetem (density matrices and a counter-based RNG).
 *
 * Theory of operation
 * -------------------
 * A register of n qubits is a density matrix rho of dimension d = 2^n stored row-major as
 * d*d complex doubles (re, im interleaved: the memory layout of numpy complex128 and of
 * C99 double _Complex). Qubit 0 is the MOST significant bit of a basis index, so qubit q
 * lives on bit position n-1-q.
 *
 * A k-qubit operator acts on 2^k x 2^k blocks of rho: for every pair (row group, column
 * group) of basis indices that agree outside the target bits, the block is replaced by
 * U M U^dagger (or sum_i K_i M K_i^dagger). Blocks do not overlap, so every kernel works
 * in place with O(4^n) work and no scratch memory; no 2^n x 2^n operator is ever built.
 *
 * The RNG is Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy
 * as 1, 2, 3", SC'11, section 3.2): sample i of (key, stream) is a pure function of
 * (key, stream, i), so any range can be generated independently (random access).
 *
 * Contract: every function returns QNETEM_OK (0) or a negative qnetem_status. Arguments
 * are checked again here (defence in depth) but the Python typed layer
 * (emulator/kernels/_c.py) validates dtype, shape and contiguity before calling.
 * No function allocates memory, keeps state or touches Python.
 *
 * The block between the two CFFI markers below is fed verbatim to cffi's cdef() by
 * cext/build_cext.py: keep it to plain declarations (no preprocessor lines).
 */
#ifndef QNETEM_H
#define QNETEM_H

#include <stddef.h>
#include <stdint.h>

/* BEGIN CFFI DECLARATIONS */

/* One complex128 element: same layout as numpy complex128. */
typedef struct {
    double re;
    double im;
} qnetem_c128;

enum qnetem_status {
    QNETEM_OK = 0,
    QNETEM_ERR_NULL = -1,        /* a required pointer is NULL */
    QNETEM_ERR_QUBITS = -2,      /* n_qubits outside [1, QNETEM_MAX_QUBITS] (or sum too big) */
    QNETEM_ERR_QUBIT = -3,       /* a qubit index is out of range */
    QNETEM_ERR_SAME_QUBIT = -4,  /* two qubit arguments are equal / duplicated */
    QNETEM_ERR_BASIS = -5,       /* basis is not Z (0), X (1) or Y (2) */
    QNETEM_ERR_ARG = -6,         /* another argument is out of its domain (r, n_kraus, count) */
    QNETEM_ERR_ZERO_PROB = -7    /* measurement outcome has zero weight: cannot renormalise */
};

enum qnetem_limits {
    QNETEM_MAX_QUBITS = 30
};

enum qnetem_basis {
    QNETEM_BASIS_Z = 0,
    QNETEM_BASIS_X = 1,
    QNETEM_BASIS_Y = 2
};

/* Version string of the package this module was built from (QNETEM_VERSION macro). */
const char *qnetem_version(void);
const char *qnetem_source_digest(void);

/* rho <- U rho U^dagger, U (2x2, row-major) acting on `qubit`. */
int qnetem_apply_1q(qnetem_c128 *rho, int n_qubits, int qubit, const qnetem_c128 *u);

/* rho <- U rho U^dagger, U (4x4, row-major); qubit_a is the more significant index of U. */
int qnetem_apply_2q(qnetem_c128 *rho, int n_qubits, int qubit_a, int qubit_b,
                    const qnetem_c128 *u);

/* rho <- sum_i K_i rho K_i^dagger, kraus = n_kraus consecutive 2x2 row-major matrices. */
int qnetem_apply_kraus_1q(qnetem_c128 *rho, int n_qubits, int qubit,
                          const qnetem_c128 *kraus, int n_kraus);

/* *p0_out = probability of outcome 0 (eigenvalue +1) of `basis` on `qubit`, clamped to [0, 1]. */
int qnetem_probability(const qnetem_c128 *rho, int n_qubits, int qubit, int basis,
                       double *p0_out);

/* Projective measurement with collapse: outcome = 0 if r < P(0) else 1; rho is replaced in
 * place by the renormalised post-measurement state; *prob_out = probability of the outcome. */
int qnetem_measure(qnetem_c128 *rho, int n_qubits, int qubit, int basis, double r,
                   int *outcome_out, double *prob_out);

/* Batched measurement of `count` separate registers of n_qubits each, stored back to back
 * in `rhos` (count * 4^n elements): item i measures qubit qubits[i] of register i in
 * bases[i] with draw rs[i], exactly as qnetem_measure does (rho collapsed in place,
 * outcomes_out[i], probs_out[i]). If rest_out is not NULL (n_qubits >= 2), it receives
 * count matrices of n_qubits - 1 qubits: register i with its measured qubit traced out,
 * exactly as qnetem_partial_trace computes it. Every argument and every outcome weight is
 * checked before any rho is written: on error no register has changed. One call replaces
 * 2 * count calls for the broker's typical measure of many heralded pairs. */
int qnetem_measure_batch(qnetem_c128 *rhos, int n_qubits, int count, const int *qubits,
                         const int *bases, const double *rs, int *outcomes_out,
                         double *probs_out, qnetem_c128 *rest_out);

/* out (2^(n-n_remove) squared) <- Tr_{remove} rho; kept qubits keep their order. */
int qnetem_partial_trace(const qnetem_c128 *rho, int n_qubits, const int *remove,
                         int n_remove, qnetem_c128 *out);

/* out <- a (x) b (Kronecker product), a's qubits first. */
int qnetem_tensor(const qnetem_c128 *a, int n_a, const qnetem_c128 *b, int n_b,
                  qnetem_c128 *out);

/* out[k] = <B_k| rho_ab |B_k> for B = Phi+, Phi-, Psi+, Psi- (qubit_a first). */
int qnetem_bell_fidelities(const qnetem_c128 *rho, int n_qubits, int qubit_a, int qubit_b,
                           double *out);

/* One Philox4x32-10 block: out = philox(ctr, key). For known-answer tests. */
void qnetem_philox4x32_10(const uint32_t *ctr, const uint32_t *key, uint32_t *out);

/* Samples start .. start+count-1 of the (key, stream) sequence. */
int qnetem_rng_u64(uint64_t key, uint64_t stream, uint64_t start, size_t count,
                   uint64_t *out);
int qnetem_rng_uniform(uint64_t key, uint64_t stream, uint64_t start, size_t count,
                       double *out);

/* GF(2) kernels on bit-packed keys (cext/qnetem_gf2.c). A key of n_bits bits is
 * ceil(n_bits/64) uint64 words; key bit i is bit (i % 64) of word i / 64 (LSB first).
 * Padding bits (>= n_bits) are ignored on input and written as 0. Positions, indices and
 * ranges are int64 (numpy's default integer); out-of-range values are QNETEM_ERR_ARG. */
int qnetem_gf2_pack(const uint8_t *bits, size_t n_bits, uint64_t *words);
int qnetem_gf2_unpack(const uint64_t *words, size_t n_bits, uint8_t *bits);
/* *parity_out = XOR of key bits [start, stop). */
int qnetem_gf2_parity_range(const uint64_t *words, size_t n_bits, size_t start, size_t stop,
                            int *parity_out);
/* out[b] = XOR of key bits [starts[b], stops[b]) for b < count. */
int qnetem_gf2_parities_ranges(const uint64_t *words, size_t n_bits, const int64_t *starts,
                               const int64_t *stops, size_t count, uint8_t *out);
/* out[b] = XOR of key bits index[j] for j in [starts[b], stops[b]) (ranges of index). */
int qnetem_gf2_parities_indexed(const uint64_t *words, size_t n_bits, const int64_t *index,
                                size_t n_index, const int64_t *starts, const int64_t *stops,
                                size_t count, uint8_t *out);
/* out bit j = key bit index[j] for j < n_out (a shuffled copy of n_out bits). */
int qnetem_gf2_gather(const uint64_t *words, size_t n_bits, const int64_t *index, size_t n_out,
                      uint64_t *out_words);
/* Flip key bit positions[k] for k < count (a position listed twice flips back). */
int qnetem_gf2_flip_bits(uint64_t *words, size_t n_bits, const int64_t *positions, size_t count);
/* *distance_out = number of positions < n_bits where a and b differ. */
int qnetem_gf2_hamming(const uint64_t *a, const uint64_t *b, size_t n_bits, uint64_t *distance_out);

/* Polynomial evaluation hash over GF(p), p = 2^127 - 1 (cext/qnetem_polyhash.c; the maths
 * in nodes/qkd/_polyhash.py): data is cut into 15-byte little-endian blocks (the last one
 * zero-padded), a block holding `length` is appended, and Horner's rule h <- (h + m) r
 * runs over them from h = 0 with r = r_lo + 2^64 r_hi. out[0] + 2^64 out[1] receives h,
 * fully reduced into [0, p). r >= p is QNETEM_ERR_ARG. */
int qnetem_poly127_hash(const uint8_t *data, size_t n, uint64_t r_lo, uint64_t r_hi, uint64_t length,
                        uint64_t *out);

/* Optical layer of decoy-state BB84 (cext/qnetem_optics.c; model and tables in
 * emulator/kernels/_optics.py). Alice's choice for pulse i: u = rng_u64(alice_key, 0, i);
 * class 0/1/2 = signal/decoy/vacuum by (u >> 32) < signal, < signal_or_decoy, else;
 * basis Z (0) iff ((u >> 1) & 0x7FFFFFFF) < basis_z, else X (1); bit = u & 1. */
typedef struct {
    uint64_t signal;
    uint64_t signal_or_decoy;
    uint64_t basis_z;
} qnetem_optics_choice;

/* Kind k = mode * 3 + class, mode 0 normal, 1 intercepted, 2 photon-number split.
 * accept[k] = P_k / p_max; entries of kind k are [kind_start[k], kind_start[k+1]) with
 * the CDF given a click, Alice's photon number, EveFlag bits and 6 pattern thresholds. */
typedef struct {
    uint64_t alice_key;
    qnetem_optics_choice choice;
    uint64_t channel_key;
    uint64_t bob_basis_z;
    uint64_t dead_slots;
    int has_candidates;
    double log1m_p_max;
    double intercept_fraction;
    int pns;
    double accept[9];
    uint32_t kind_start[10];
    const double *entry_cdf;
    const uint8_t *entry_photons;
    const uint8_t *entry_flags;
    const double *entry_pattern;
    size_t n_entries;
} qnetem_optics_model;

typedef struct {
    uint64_t ordinal;
    uint64_t position;
    uint64_t dead_until;
} qnetem_optics_cursor;

typedef struct {
    uint64_t *pulse;
    uint8_t *bob_basis;
    uint8_t *outcome;
    uint8_t *double_click;
    uint8_t *photons;
    uint8_t *alice_class;
    uint8_t *alice_basis;
    uint8_t *alice_bit;
    uint8_t *eve;
} qnetem_optics_out;

/* cls/basis/bit[j] = Alice's choices for pulse indices[j]. */
int qnetem_optics_choices(uint64_t alice_key, const uint64_t *indices, size_t count,
                          const qnetem_optics_choice *thresholds, uint8_t *cls,
                          uint8_t *basis, uint8_t *bit);
/* Registered clicks among pulses [cursor->position, end) (end <= 2^53), at most capacity;
 * writes *count_out rows of out and advances *cursor. */
int qnetem_optics_sample(const qnetem_optics_model *model, qnetem_optics_cursor *cursor,
                         uint64_t end, size_t capacity, const qnetem_optics_out *out,
                         size_t *count_out);

/* END CFFI DECLARATIONS */

#endif /* QNETEM_H */
