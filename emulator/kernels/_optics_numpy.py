"""numpy twin of cext/qnetem_optics.c: Alice's choices and the detection sampler.

Theory of operation
-------------------
Same draws, same comparisons, same order of floating-point operations as the C kernel
(see its header comment for the proof that the sampler realises the per-pulse model), but
vectorised: a chunk of K gap draws (consecutive ordinals) becomes K candidate positions by
a cumulative sum; the candidates' kinds and acceptance draws are evaluated at once; the
dead-time rule (drop candidates within dead_slots of a registered click) is a greedy scan
over the accepted candidates only, vectorised when no two are that close. The C kernel
works in batches of 256 candidates, this twin in chunks of up to 65 536: every draw is
addressed by (stream, index), so the order of the work is invisible in the result.

The one transcendental function in the loop is the logarithm of the gap draw. numpy's
SIMD ``log`` may differ from the C library's in the last bit; a gap ``floor(log(u)/L)``
can only change when the quotient lies within a few ulps of an integer, so those rare
quotients are recomputed with ``math.log`` (the C library's ``log``), which makes the
gaps — and hence every detection — identical to the C backend's.
"""

from __future__ import annotations

import math

import numpy as np

from ._optics import (
    BITS_STREAM,
    CANDIDATE_STREAM,
    CHOICE_STREAM,
    DETAIL_STREAM,
    GAP_STREAM,
    ChoiceThresholds,
    Detections,
    EveFlag,
    OpticsChecked,
    OpticsCursor,
    OpticsModel,
    PulseChoices,
    PulseMode,
)

__all__ = ["NumpyOpticsMixin"]

_MASK32 = np.uint64(0xFFFFFFFF)
_MASK31 = np.uint64(0x7FFFFFFF)
_S11 = np.uint64(11)
_S32 = np.uint64(32)
_ONE = np.uint64(1)
_TWO_M53 = 2.0**-53
_MAX_CHUNK = 1 << 16
_INT63 = (1 << 63) - 1


def _block_at(key: int, stream: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) = (x0 | x1 << 32, x2 | x3 << 32) of the Philox block at counter
    (index, stream) under key, per index; lo is rng_u64's sample `index` of (key, stream)."""
    from ._numpy import philox4x32_10  # lazy: _numpy imports this module

    i = indices.astype(np.uint64, copy=False)
    c2 = np.uint64(stream & 0xFFFFFFFF)
    c3 = np.uint64(stream >> 32)
    x0, x1, x2, x3 = philox4x32_10((i & _MASK32, i >> _S32, c2, c3), (key & 0xFFFFFFFF, key >> 32))
    return x0 | (x1 << _S32), x2 | (x3 << _S32)


def _rng_at(key: int, stream: int, indices: np.ndarray) -> np.ndarray:
    return _block_at(key, stream, indices)[0]


def _unit53(w: np.ndarray) -> np.ndarray:
    return (w >> _S11).astype(np.float64) * _TWO_M53


def _decode(u: np.ndarray, t: ChoiceThresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    hi = u >> _S32
    cls = np.where(hi < np.uint64(t.signal), 0, np.where(hi < np.uint64(t.signal_or_decoy), 1, 2))
    basis = np.where(((u >> _ONE) & _MASK31) < np.uint64(t.basis_z), 0, 1)
    return cls.astype(np.uint8), basis.astype(np.uint8), (u & _ONE).astype(np.uint8)


def _gaps(w: np.ndarray, log1m_p: float) -> np.ndarray:
    """floor(log(open53(w)) / log1m_p) as float64, identical to the C expression."""
    u = ((w >> _S11) + _ONE).astype(np.float64) * _TWO_M53
    q = np.log(u) / log1m_p
    near = np.abs(q - np.rint(q)) <= 1e-12 * np.maximum(1.0, np.abs(q))
    if near.any():
        q[near] = [math.log(x) / log1m_p for x in u[near].tolist()]
    return np.floor(q)


def _gap_draws(key: int, first: int, count: int) -> np.ndarray:
    """Gap words of ordinals first .. first+count-1: ordinal j is half j & 1 (lo, hi) of
    block j >> 1, so the blocks' halves interleaved are the words of consecutive ordinals."""
    b0 = first >> 1
    n_blocks = ((first + count - 1) >> 1) - b0 + 1
    lo, hi = _block_at(key, GAP_STREAM, np.arange(n_blocks, dtype=np.uint64) + np.uint64(b0))
    words = np.empty(2 * n_blocks, dtype=np.uint64)
    words[0::2] = lo
    words[1::2] = hi
    return words[first & 1 : (first & 1) + count]


def _dead_filter(pos: np.ndarray, dead_until: int, dead_slots: int) -> np.ndarray:
    """Indices of the accepted candidates a non-paralysable detector registers."""
    if pos.size == 0:
        return np.empty(0, dtype=np.intp)
    if dead_slots == 0 or (pos.size == 1) or bool((np.diff(pos) > dead_slots).all()):
        return np.nonzero(pos >= dead_until)[0]  # only the carried-in dead time can bite
    keep = []
    du = dead_until
    for k, p in enumerate(pos.tolist()):
        if p >= du:
            keep.append(k)
            du = p + 1 + dead_slots
    return np.array(keep, dtype=np.intp)


class NumpyOpticsMixin(OpticsChecked):
    """Optics kernels of the numpy backend (needs ``_impl_rng_u64`` of the backend)."""

    def _impl_optics_choices(
        self, alice_key: int, indices: np.ndarray, thresholds: ChoiceThresholds
    ) -> PulseChoices:
        if indices.size == 0:
            empty = np.empty(0, dtype=np.uint8)
            return PulseChoices(empty, empty.copy(), empty.copy())
        return PulseChoices(*_decode(_rng_at(alice_key, CHOICE_STREAM, indices), thresholds))

    def _impl_optics_sample(
        self, model: OpticsModel, cursor: OpticsCursor, end: int, capacity: int
    ) -> tuple[Detections, OpticsCursor]:
        j, s, dead = cursor.ordinal, cursor.position, cursor.dead_until
        if model.p_max <= 0.0:
            return Detections.empty(), OpticsCursor(j, max(s, end), dead)
        dead_slots = model.parameters.dead_slots
        parts: list[Detections] = []
        count = 0
        while count < capacity and s < end:
            span = end - s
            expected = span * model.p_max
            k = int(min(_MAX_CHUNK, max(256.0, 1.1 * expected + 6.0 * math.sqrt(expected) + 16.0)))
            k = max(1, min(k, _INT63 // (span + 1), (1 << 64) - j))
            g = _gaps(_gap_draws(model.channel_key, j, k), model.log1m_p_max)
            steps = np.minimum(g, float(span)).astype(np.int64) + 1  # capped: no int64 overflow
            pos = s - 1 + np.cumsum(steps)
            n_valid = int(np.searchsorted(pos, end, side="left"))
            cand = pos[:n_valid].astype(np.uint64)
            kept, details = self._accepted(model, cand, dead, dead_slots)
            # Stop right after the capacity-th click, as the C loop does (same cursor).
            truncated = kept.size >= capacity - count
            if truncated:
                kept = kept[: capacity - count]
                details = details.head(kept.size)
            if kept.size:
                parts.append(details)
                count += kept.size
                dead = int(cand[kept[-1]]) + 1 + dead_slots
            if truncated:
                j += int(kept[-1]) + 1
                s = int(cand[kept[-1]]) + 1
                break
            j += n_valid
            if n_valid:
                s = int(pos[n_valid - 1]) + 1
            if n_valid < k:
                break  # the next gap reaches end: leave its draw unused
        return Detections.concatenate(parts), OpticsCursor(j, s, dead)

    def _accepted(
        self, model: OpticsModel, cand: np.ndarray, dead_until: int, dead_slots: int
    ) -> tuple[np.ndarray, Detections]:
        """Kept candidate indices (into cand) and their detections."""
        if cand.size == 0:
            return np.empty(0, dtype=np.intp), Detections.empty()
        ck = model.channel_key
        cls, a_basis, a_bit = _decode(_rng_at(model.alice_key, CHOICE_STREAM, cand), model.choice)
        eve = model.parameters.eve
        mode = np.full(cand.shape, PulseMode.PNS if eve.pns else PulseMode.NORMAL, dtype=np.int64)
        f = eve.intercept_fraction
        lo = None  # acceptance words (lo) and intercept words (hi) of the candidates
        if 0.0 < f < 1.0:
            lo, hi = _block_at(ck, CANDIDATE_STREAM, cand)
            mode[_unit53(hi) < f] = PulseMode.INTERCEPTED
        elif f >= 1.0:
            mode[:] = PulseMode.INTERCEPTED
        kind = mode * 3 + cls
        acc = model.accept[kind]
        ok = acc > 0.0
        draw = ok & (acc < 1.0)
        if draw.any():
            words = lo[draw] if lo is not None else _rng_at(ck, CANDIDATE_STREAM, cand[draw])
            ok[draw] = _unit53(words) < acc[draw]
        accepted = np.nonzero(ok)[0]
        kept = accepted[_dead_filter(cand[accepted].astype(np.int64), dead_until, dead_slots)]
        return kept, self._details(model, cand[kept], kind[kept], cls[kept], a_basis[kept], a_bit[kept])

    def _details(
        self,
        model: OpticsModel,
        c: np.ndarray,
        kind: np.ndarray,
        cls: np.ndarray,
        a_basis: np.ndarray,
        a_bit: np.ndarray,
    ) -> Detections:
        ck = model.channel_key
        entry_word, pattern_word = _block_at(ck, DETAIL_STREAM, c)
        ue = _unit53(entry_word)
        entry = np.empty(c.shape, dtype=np.int64)
        for k in np.unique(kind).tolist():
            first, stop = int(model.kind_start[k]), int(model.kind_start[k + 1])
            sel = kind == k
            found = first + np.searchsorted(model.entry_cdf[first:stop], ue[sel], side="right")
            entry[sel] = np.minimum(found, stop - 1)
        wb = _rng_at(ck, BITS_STREAM, c)
        bob = np.where(((wb >> _S32) & _MASK31) < np.uint64(model.bob_basis_z), 0, 1).astype(np.uint8)
        eve_basis = (wb & _ONE).astype(np.uint8)
        eve_bit = ((wb >> _ONE) & _ONE).astype(np.uint8)
        squash = ((wb >> np.uint64(2)) & _ONE).astype(np.uint8)
        flags = model.entry_flags[entry].copy()
        intercepted = (flags & EveFlag.INTERCEPTED) != 0
        matched = eve_basis == a_basis
        flags[intercepted & matched] |= np.uint8(EveFlag.BASIS_MATCHED)
        beta = np.where(intercepted, eve_basis, a_basis)
        y = np.where(intercepted & ~matched, eve_bit, a_bit)
        qcase = np.where(beta != bob, 2, y).astype(np.int64)
        t0 = model.entry_pattern[entry, 2 * qcase]
        t01 = model.entry_pattern[entry, 2 * qcase + 1]
        up = _unit53(pattern_word)
        single0 = up < t0
        single = up < t01
        outcome = np.where(single0, 0, np.where(single, 1, squash)).astype(np.uint8)
        return Detections(
            pulse=c.astype(np.uint64),
            bob_basis=bob,
            outcome=outcome,
            double_click=(~single).astype(np.uint8),
            photons=model.entry_photons[entry],
            alice_class=cls,
            alice_basis=a_basis,
            alice_bit=a_bit,
            eve=flags,
        )
