"""Privacy amplification by Toeplitz hashing over GF(2), in O(n log n).

Theory of operation
-------------------
After verification both ends hold the same corrected key ``x`` of ``n`` bits, of which
Eve may know a part. Hashing it with a matrix drawn uniformly from a universal2 family
leaves ``m`` bits that are ε-close to uniform and independent of Eve's knowledge when
``m`` is the smooth min-entropy minus the security terms (leftover hash lemma; Renner,
PhD thesis ETH Zurich 2005, §5.6; Tomamichel et al., IEEE TIT 57, 5524 (2011)). Random
binary Toeplitz matrices form such a family: for every fixed non-zero ``z``, ``T·z`` is
uniform over {0,1}^m (Mansour, Nisan, Tiwari, STOC 1990; Krawczyk, CRYPTO '94), so
``Pr[T·x = T·y] = 2^-m`` for ``x != y``.

Matrix convention. An m×n Toeplitz matrix is fixed by ``n + m - 1`` seed bits ``s``::

    T[i, j] = s[i - j + n - 1]        (0 <= i < m, 0 <= j < n)

so row 0 is ``s[n-1], s[n-2], ..., s[0]`` and column 0 is ``s[n-1 .. n+m-2]``. Then

    y[i] = XOR_j s[i - j + n - 1] & x[j] = (s * x)[i + n - 1]  mod 2,

a window of the integer (acyclic) convolution ``s * x`` taken mod 2. A cyclic
convolution of any length ``N >= n + m - 1`` gives the same window: for the indices
used, ``0 <= i + n - 1 - j <= n + m - 2 < N``, so nothing wraps around.

Computation. ``toeplitz_hash`` computes that window with a real FFT (numpy's pocketfft)
of a 5-smooth length N >= n + m - 1, rounds to integers and keeps the low bit:
three transforms, O(N log N), never an O(n·m) loop. Why the rounding is exact:

* Every true value ``c_k = sum_j s[k-j] x[j]`` is an integer in ``[0, n]``.
* Percival, "Rapid multiplication modulo the sum and difference of highly composite
  numbers", Math. Comp. 72 (2003) 387-395, Theorem 5.1 bounds the error of an
  FFT-based cyclic convolution of length 2^K computed in IEEE double precision:
  ``||c' - c||_inf < ||s||_2 ||x||_2 [(1+u)^3K (1+u sqrt5)^(3K+1) (1+b)^3K - 1]`` with
  u = 2^-53 and b the error of the twiddle factors. For 0/1 inputs
  ``||s||_2 ||x||_2 <= sqrt((n+m-1) n) < 2 n``. Taking K = 28 (one more level than the
  largest length accepted here, for the real-to-complex packing) and a generous
  b = 8u, the bracket is < (3K + sqrt5 (3K+1) + 3K·8) u < 1.1e-13, so the error is
  below 2 n · 1.1e-13 < 3e-5 for every accepted size (n + m - 1 <= 2^27): more than
  four orders of magnitude below the 1/2 that rounding tolerates. The margin covers
  the constant factors of pocketfft's mixed radix-2/3/4/5 passes, which the radix-2
  theorem does not model exactly.
* A run-time guard backs the bound: if any value of the window lies more than 1/4
  from an integer, the FFT result is discarded and the number-theoretic transform
  below recomputes it. A silently wrong bit would need an error >= 3/4 at some output
  while every output stays within 1/4 of an integer — an error ~10^4 times the bound.
* Because the rounded integers are exact, two machines with different FFT builds get
  bit-identical keys; both ends of a link must.

``ConvolutionMethod.NTT`` computes the same window with a number-theoretic transform
over Z_p, p = 15·2^27 + 1 (prime; 31 generates its multiplicative group), in uint64
arithmetic: residues < 2^31, so every product < 2^62 is exact, and every ``c_k <= n < p``
so ``c_k mod p = c_k``. It is exact by construction (no rounding anywhere) and about
15 times slower; it serves as the fallback and as an independent check in tests.

Bit formats. The functions take and return **unpacked** bits: 1-D ``uint8`` (or
``bool``) arrays of 0/1, index i = bit i. The project's packed format (the Cascade
kernels use it) is ``uint64`` words, little-endian within words: bit i is bit
``i % 64`` (value ``1 << (i % 64)``) of word ``i // 64``, unused high bits of the last
word zero. ``pack_bits``/``unpack_bits`` convert, and ``toeplitz_hash_packed`` takes and returns
packed arrays (it unpacks internally: the FFT needs one number per bit).

Output length contract. The caller supplies ``n_out``: the secret key length of the
finite-key bound (Lim, Curty, Walenta, Xu, Zbinden, PRA 89, 022307 (2014), eq. (1)) —
``emulator.physics.qkd.finite_key_length(block).key_length_bits``, already floored and
clipped at 0 — for this very block, computed with the bits Cascade disclosed as the
error-correction leakage. The verification tag is paid for by that formula's
log2(2/ε_cor) term when ``VerificationHash.for_epsilon(n, ε_cor)`` sized it with the
same ε_cor. This module checks only ``0 <= n_out <= n_in``; ``n_out == 0`` returns an
empty key (the block yields no key). The seed must be uniformly random and chosen
after the key is fixed (one end draws it with ``draw_seed`` and sends it over
the authenticated channel); it need not be secret.
"""

from __future__ import annotations

import enum
import math

import numpy as np

__all__ = [
    "MAX_SEED_BITS",
    "AmplificationError",
    "BitFormatError",
    "ConvolutionMethod",
    "OutputLengthError",
    "SeedLengthError",
    "draw_seed",
    "pack_bits",
    "seed_length",
    "toeplitz_hash",
    "toeplitz_hash_packed",
    "toeplitz_hash_reference",
    "toeplitz_matrix",
    "unpack_bits",
]

#: Largest accepted ``n_in + n_out - 1`` (the NTT below supports lengths up to 2^27;
#: the FFT error bound in the module docstring is worked out for this size).
MAX_SEED_BITS = 1 << 27

#: The reference (matrix) implementation refuses matrices with more entries than this.
_REFERENCE_MAX_ENTRIES = 1 << 26

#: An FFT output farther than this from an integer triggers the exact NTT fallback.
_ROUNDING_GUARD = 0.25


class AmplificationError(ValueError):
    """Bad arguments to privacy amplification (the caller's fault)."""


class SeedLengthError(AmplificationError):
    """The Toeplitz seed does not have n_in + n_out - 1 bits."""


class OutputLengthError(AmplificationError):
    """The requested output length is negative or larger than the input."""


class BitFormatError(AmplificationError):
    """An array is not a 1-D array of 0/1 bits (or of packed uint64 words)."""


class ConvolutionMethod(enum.Enum):
    FFT = "fft"  # float64 FFT with proven rounding margin and an NTT fallback (default)
    NTT = "ntt"  # exact number-theoretic transform mod 15·2^27+1 (slower)


# --------------------------------------------------------------------------- bits


def _as_bits(arr: np.ndarray, what: str) -> np.ndarray:
    """Check a 1-D array of 0/1 values and return it as uint8 (no copy when it already is)."""
    a = np.asarray(arr)
    if a.ndim != 1:
        raise BitFormatError(f"{what} must be a 1-D bit array, got shape {a.shape}")
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    if a.dtype != np.uint8:
        raise BitFormatError(f"{what} must have dtype uint8 or bool (0/1 bits), got {a.dtype}")
    if a.size and int(a.max()) > 1:
        raise BitFormatError(f"{what} must hold only 0 and 1")
    return a


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack 0/1 bits into uint64 words, little-endian within words (bit i -> word i//64, bit i%64)."""
    b = _as_bits(bits, "bits")
    n_words = -(-b.size // 64)
    as_bytes = np.packbits(b, bitorder="little")
    padded = np.zeros(n_words * 8, dtype=np.uint8)
    padded[: as_bytes.size] = as_bytes
    return padded.view("<u8").astype(np.uint64)


def unpack_bits(words: np.ndarray, n_bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``n_bits`` bits of the words, as uint8 0/1."""
    w = np.asarray(words)
    if w.ndim != 1 or w.dtype != np.uint64:
        raise BitFormatError(f"packed bits must be a 1-D uint64 array, got {w.dtype} shape {w.shape}")
    if n_bits < 0 or w.size != -(-n_bits // 64):
        raise BitFormatError(f"{n_bits} bits need {-(-max(n_bits, 0) // 64)} uint64 words, got {w.size}")
    as_bytes = np.ascontiguousarray(w.astype("<u8")).view(np.uint8)
    return np.unpackbits(as_bytes, bitorder="little", count=n_bits)


# --------------------------------------------------------------------------- seed


def seed_length(n_in: int, n_out: int) -> int:
    """Number of seed bits of an n_out × n_in Toeplitz matrix: n_in + n_out - 1."""
    _check_lengths(n_in, n_out)
    return n_in + n_out - 1


def draw_seed(rng: np.random.Generator, n_in: int, n_out: int) -> np.ndarray:
    """Draw a uniformly random seed (uint8 0/1 bits) for an n_out × n_in Toeplitz matrix."""
    return rng.integers(0, 2, size=seed_length(n_in, n_out), dtype=np.uint8)


def _check_lengths(n_in: int, n_out: int) -> None:
    if n_in < 1:
        raise AmplificationError(f"the key to amplify must have at least 1 bit, got {n_in}")
    if n_out < 0 or n_out > n_in:
        raise OutputLengthError(f"output length must be in [0, {n_in}] for a {n_in}-bit key, got {n_out}")
    if n_in + n_out - 1 > MAX_SEED_BITS:
        raise AmplificationError(
            f"a {n_out}x{n_in} Toeplitz matrix exceeds the supported size (n_in + n_out - 1 <= {MAX_SEED_BITS})"
        )


def _check_seed(seed: np.ndarray, n_in: int, n_out: int) -> None:
    need = n_in + n_out - 1
    if seed.size != need:
        raise SeedLengthError(f"the seed has {seed.size} bits; a {n_out}x{n_in} Toeplitz matrix needs {need}")


# --------------------------------------------------------------------------- hashing


def toeplitz_hash(
    key_bits: np.ndarray,
    seed_bits: np.ndarray,
    n_out: int,
    *,
    method: ConvolutionMethod = ConvolutionMethod.FFT,
) -> np.ndarray:
    """Return ``T·key`` over GF(2) as ``n_out`` uint8 0/1 bits, T the Toeplitz matrix of ``seed_bits``.

    ``key_bits``: the n_in-bit corrected key; ``seed_bits``: n_in + n_out - 1 uniformly
    random bits (see :func:`draw_seed`); both unpacked uint8/bool 0/1 arrays. Raises
    :class:`SeedLengthError`, :class:`OutputLengthError` or :class:`BitFormatError`.
    """
    x = _as_bits(key_bits, "key")
    s = _as_bits(seed_bits, "seed")
    n_in = x.size
    _check_lengths(n_in, n_out)
    _check_seed(s, n_in, n_out)
    if n_out == 0:
        return np.zeros(0, dtype=np.uint8)
    if method is ConvolutionMethod.NTT:
        window = _window_ntt(s, x, n_in, n_out)
    elif method is ConvolutionMethod.FFT:
        window = _window_fft(s, x, n_in, n_out)
        if window is None:  # rounding guard tripped: recompute exactly
            window = _window_ntt(s, x, n_in, n_out)
    else:
        raise AmplificationError(f"unknown convolution method {method!r}")
    return (window & 1).astype(np.uint8)


def toeplitz_hash_packed(key_words: np.ndarray, n_in: int, seed_words: np.ndarray, n_out: int) -> np.ndarray:
    """:func:`toeplitz_hash` on packed uint64 words (see :func:`pack_bits`); returns packed words.

    ``seed_words`` holds ``n_in + n_out - 1`` bits. Bits beyond the stated lengths in
    the last words are ignored.
    """
    _check_lengths(n_in, n_out)
    key = unpack_bits(key_words, n_in)
    seed = unpack_bits(seed_words, n_in + n_out - 1)
    return pack_bits(toeplitz_hash(key, seed, n_out))


# --------------------------------------------------------------------------- FFT path


def _fast_length(n: int) -> int:
    """Smallest 5-smooth integer >= n (pocketfft is fastest on lengths 2^a 3^b 5^c)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            # smallest p35 * 2^k >= n
            q = p35
            if q < n:
                q <<= (-(-n // q) - 1).bit_length()
            best = min(best, q)
            p35 *= 3
        p5 *= 5
    return best


def _window_fft(s: np.ndarray, x: np.ndarray, n_in: int, n_out: int) -> np.ndarray | None:
    """Window [n_in-1, n_in-1+n_out) of s*x by float64 FFT, rounded; None if the guard trips."""
    length = _fast_length(n_in + n_out - 1)
    spec = np.fft.rfft(s.astype(np.float64), length)
    spec *= np.fft.rfft(x.astype(np.float64), length)
    conv = np.fft.irfft(spec, length)[n_in - 1 : n_in - 1 + n_out]
    rounded = np.rint(conv)
    if float(np.max(np.abs(conv - rounded))) > _ROUNDING_GUARD:
        return None
    return rounded.astype(np.int64)


# --------------------------------------------------------------------------- NTT path

_P = 2013265921  # 15 * 2^27 + 1, prime
_G = 31  # a generator of (Z/pZ)^*
_P64 = np.uint64(_P)
_MAX_NTT_LOG2 = 27


def _root_powers(root: int, count: int) -> np.ndarray:
    """[root^0, root^1, ..., root^(count-1)] mod p as uint64, vectorised in sqrt(count) blocks."""
    block = max(1, math.isqrt(count))
    low = np.empty(block, dtype=np.uint64)
    acc = 1
    for k in range(block):
        low[k] = acc
        acc = acc * root % _P
    step = acc  # root^block
    n_high = -(-count // block)
    high = np.empty(n_high, dtype=np.uint64)
    acc = 1
    for k in range(n_high):
        high[k] = acc
        acc = acc * step % _P
    return ((high[:, None] * low[None, :]) % _P64).reshape(-1)[:count]


def _ntt_dif(a: np.ndarray, twiddles: np.ndarray) -> None:
    """In-place forward NTT (Gentleman-Sande, natural order in, bit-reversed order out).

    ``twiddles[k] = w^k`` for k < N/2, w a primitive N-th root of unity.
    """
    n = a.size
    h = n // 2
    while h >= 1:
        blocks = a.reshape(-1, 2 * h)
        u = blocks[:, :h]
        v = blocks[:, h:]
        w = twiddles[:: n // (2 * h)][:h]
        total = u + v
        total -= _P64 * (total >= _P64)
        diff = u + _P64 - v
        diff -= _P64 * (diff >= _P64)
        blocks[:, :h] = total
        blocks[:, h:] = diff * w % _P64
        h //= 2


def _intt_dit(a: np.ndarray, inv_twiddles: np.ndarray) -> None:
    """In-place inverse NTT without the 1/N factor (Cooley-Tukey, bit-reversed in, natural out)."""
    n = a.size
    h = 1
    while h < n:
        blocks = a.reshape(-1, 2 * h)
        u = blocks[:, :h]
        w = inv_twiddles[:: n // (2 * h)][:h]
        v = blocks[:, h:] * w % _P64
        total = u + v
        total -= _P64 * (total >= _P64)
        diff = u + _P64 - v
        diff -= _P64 * (diff >= _P64)
        blocks[:, :h] = total
        blocks[:, h:] = diff
        h *= 2


def _window_ntt(s: np.ndarray, x: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    """Window [n_in-1, n_in-1+n_out) of s*x, exactly, by NTT mod 15·2^27+1."""
    need = n_in + n_out - 1
    log2n = max(1, (need - 1).bit_length())
    if log2n > _MAX_NTT_LOG2:  # pragma: no cover - _check_lengths bounds need by 2^27
        raise AmplificationError(f"NTT length 2^{log2n} exceeds 2^{_MAX_NTT_LOG2}")
    n = 1 << log2n
    w = pow(_G, (_P - 1) >> log2n, _P)  # primitive n-th root of unity
    tw = _root_powers(w, n // 2)
    itw = _root_powers(pow(w, _P - 2, _P), n // 2)
    fs = np.zeros(n, dtype=np.uint64)
    fs[: s.size] = s
    fx = np.zeros(n, dtype=np.uint64)
    fx[: x.size] = x
    _ntt_dif(fs, tw)
    _ntt_dif(fx, tw)
    fs *= fx  # pointwise product (both in the same bit-reversed order); < 2^62
    fs %= _P64
    _intt_dit(fs, itw)
    window = fs[n_in - 1 : n_in - 1 + n_out] * np.uint64(pow(n, _P - 2, _P)) % _P64
    return window.astype(np.int64)


# --------------------------------------------------------------------------- reference (tests only)


def toeplitz_matrix(seed_bits: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    """The explicit n_out × n_in matrix T[i, j] = seed[i - j + n_in - 1] (tests and benches only)."""
    s = _as_bits(seed_bits, "seed")
    _check_lengths(n_in, n_out)
    _check_seed(s, n_in, n_out)
    if n_in * n_out > _REFERENCE_MAX_ENTRIES:
        raise AmplificationError(
            f"the reference product is O(n*m) and refuses {n_out}x{n_in} (> {_REFERENCE_MAX_ENTRIES} entries)"
        )
    rows = np.arange(n_out)[:, None]
    cols = np.arange(n_in)[None, :]
    return s[rows - cols + n_in - 1]


def toeplitz_hash_reference(key_bits: np.ndarray, seed_bits: np.ndarray, n_out: int) -> np.ndarray:
    """Direct O(n·m) matrix-vector product mod 2 — the slow reference for tests and benches only."""
    x = _as_bits(key_bits, "key")
    t = toeplitz_matrix(seed_bits, x.size, n_out)
    return ((t.astype(np.int64) @ x.astype(np.int64)) & 1).astype(np.uint8)
