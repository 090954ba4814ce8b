"""Sans-IO optical layer of one decoy-state BB84 link, as the broker runs it.

Theory of operation
-------------------
A QKD link's transmitter (Alice) fires weak coherent pulses at ``pulse_rate_hz`` from
emulated time 0: pulse ``i`` leaves at ``i / pulse_rate_hz``, so the pulses sent before
time t are ``[0, pulses_before(t))``. Her choice for every pulse (intensity class, basis,
bit) is a pure function of a 64-bit key that only her node receives (``alice_key``) and
of the pulse index — ``emulator.kernels`` backend ``optics_choices(alice_key, indices,
thresholds)``, with ``OpticalLinkConfig.choice_thresholds()`` — so the pulse record never
travels. The broker, which derives that key, also holds a ``channel_key`` of its own for
everything else (photon numbers, loss, detectors, Bob's bases, Eve).

:class:`OpticalLink` holds one link's state: the configuration, Eve's switches, whether
the fibre is cut, the sampler's cursor and running statistics. Driving it is a single
call, ``advance(now_s)`` (or ``advance_to_pulse(end)``), which returns the next
:class:`DetectionBatch`: the registered clicks among the pulses not yet decided, at most
``max_detections`` of them (``batch.complete`` says whether the window reached the
requested end; if not, call again — nothing is lost or repeated). The cost is
proportional to the detections, not the pulses (emulator.kernels._optics). No clock, no
socket, no global RNG: the same keys, configuration, switch history and call sequence
give the same detections, and cutting a window into several calls changes nothing as long
as the parameters stay the same.

What travels: ``batch.for_receiver()`` holds the four arrays Bob may see (pulse index,
his basis, his outcome, double-click flag) — packed numpy arrays, as the wire protocol
wants (DESIGN §4). Alice's choices, photon numbers and Eve's flags stay in the broker,
where they feed statistics and the report: ``statistics().eve`` says how many detected
pulses Eve intercepted, on how many her basis matched Alice's (she knows those bits), how
many multi-photon pulses she split, and the expected numbers over all pulses sent.

Switching parameters (Eve on/off, fibre cut) mid-run keeps the process exact: the
pending gap draw, which was observed to reach past the last window's end, is discarded
and the candidate process restarts at the next undecided pulse (a Bernoulli process is
memoryless), unless the candidate rate is unchanged, in which case it simply continues.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Final

import numpy as np

from emulator.kernels import (
    MAX_PULSE_INDEX,
    Backend,
    ChoiceThresholds,
    Detections,
    Eavesdropper,
    EveFlag,
    KernelError,
    OpticsCursor,
    OpticsModel,
    OpticsParameters,
    build_optics_model,
    derive_key,
    get_backend,
)
from emulator.physics import DecoyIntensities, multi_photon_probability, transmittance

__all__ = [
    "DEFAULT_MAX_DETECTIONS",
    "DetectionBatch",
    "Eavesdropper",
    "EveStatistics",
    "OpticalLink",
    "OpticalLinkConfig",
    "OpticalLinkError",
    "OpticalLinkStatistics",
    "ReceiverRecord",
    "link_keys",
    "pns_gain_matching",
]

#: Largest batch one call returns by default: 2**20 detections are 11 MiB of packed
#: arrays (8 + 3 bytes each), below the wire's 16 MiB frame limit.
DEFAULT_MAX_DETECTIONS: Final[int] = 1 << 20


class OpticalLinkError(ValueError):
    """An optical-link parameter or call is invalid (names the field and the value)."""


def link_keys(run_seed: int, transmitter: str, receiver: str) -> tuple[int, int]:
    """(alice_key, channel_key) of the link transmitter -> receiver for a run seed.

    alice_key goes to the transmitter's node (and nowhere else); channel_key never leaves
    the broker. Both are derive_key values (BLAKE2b-64 of labelled inputs)."""
    return (
        derive_key(run_seed, "qkd", "source", transmitter, receiver),
        derive_key(run_seed, "qkd", "channel", transmitter, receiver),
    )


@dataclass(frozen=True, slots=True)
class OpticalLinkConfig:
    """Physical description of a QKD link (defaults: the GYS set of Ma et al. 2005, Table I).

    intensities: mean photon numbers of signal > decoy > vacuum (Ma et al. Sec. II;
    signal 0.48 is the asymptotic optimum for GYS). class_probabilities: (signal, decoy,
    vacuum). basis_z_probability: Alice's P(Z); bob_basis_z_probability: Bob's (None =
    Alice's). dark_count_probability: Y0, per pulse for Bob's two detectors together
    (Y0/2 each). dead_time_s: after a click both detectors are blind for the next
    dead_slots() pulses.
    """

    length_km: float
    pulse_rate_hz: float = 1e9
    intensities: DecoyIntensities = field(default_factory=lambda: DecoyIntensities(0.48, 0.05, 0.0))
    class_probabilities: tuple[float, float, float] = (0.8, 0.1, 0.1)
    basis_z_probability: float = 0.5
    bob_basis_z_probability: float | None = None
    attenuation_db_per_km: float = 0.21
    receiver_efficiency: float = 0.045
    dark_count_probability: float = 1.7e-6
    misalignment_error: float = 0.033
    dead_time_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.length_km >= 0.0 and math.isfinite(self.length_km)):
            raise OpticalLinkError(f"length_km must be finite and >= 0, got {self.length_km!r}")
        if not (self.pulse_rate_hz > 0.0 and math.isfinite(self.pulse_rate_hz)):
            raise OpticalLinkError(f"pulse_rate_hz must be finite and > 0, got {self.pulse_rate_hz!r}")
        if not (self.dead_time_s >= 0.0 and math.isfinite(self.dead_time_s)):
            raise OpticalLinkError(f"dead_time_s must be finite and >= 0, got {self.dead_time_s!r}")
        try:
            self.parameters(Eavesdropper(), fibre_cut=False)
        except (KernelError, ValueError) as exc:
            raise OpticalLinkError(str(exc)) from None

    def channel_transmittance(self) -> float:
        """eta_ch = 10^(-alpha L / 10) (Ma et al. Sec. II)."""
        return transmittance(self.length_km, self.attenuation_db_per_km)

    def dead_slots(self) -> int:
        """Pulses c+1 .. c+k fall within dead_time_s of a click at pulse c: k = ceil(tau R) - 1
        (a pulse exactly tau after the click is live; 1e-9 relative slack absorbs rounding)."""
        slots = self.dead_time_s * self.pulse_rate_hz
        return max(0, math.ceil(slots * (1.0 - 1e-9)) - 1)

    def choice_thresholds(self) -> ChoiceThresholds:
        """What Alice's node needs, besides her key, to compute her choices."""
        p = self.class_probabilities
        return ChoiceThresholds.from_probabilities(p[0], p[1], self.basis_z_probability)

    def parameters(self, eve: Eavesdropper, *, fibre_cut: bool) -> OpticsParameters:
        bob_z = self.bob_basis_z_probability
        if bob_z is None:
            bob_z = self.basis_z_probability
        i = self.intensities
        return OpticsParameters(
            intensities=(i.signal, i.decoy, i.vacuum),
            class_probabilities=tuple(float(p) for p in self.class_probabilities),  # type: ignore[arg-type]
            channel_transmittance=0.0 if fibre_cut else self.channel_transmittance(),
            receiver_efficiency=self.receiver_efficiency,
            dark_count_probability=self.dark_count_probability,
            misalignment_error=self.misalignment_error,
            alice_basis_z_probability=self.basis_z_probability,
            bob_basis_z_probability=bob_z,
            dead_slots=self.dead_slots(),
            eve=eve,
        )


@dataclass(frozen=True, slots=True, repr=False)
class ReceiverRecord:
    """What Bob receives for a batch: pulse (uint64), basis (uint8: 0 Z, 1 X), outcome
    (uint8), double_click (uint8), one row per detected pulse, in pulse order."""

    pulse: np.ndarray
    basis: np.ndarray
    outcome: np.ndarray
    double_click: np.ndarray

    def __len__(self) -> int:
        return int(self.pulse.shape[0])

    def __repr__(self) -> str:
        return f"<ReceiverRecord of {len(self)} detections>"


@dataclass(frozen=True, slots=True, repr=False)
class DetectionBatch:
    """The registered clicks among pulses [first_pulse, end_pulse) of one link.

    complete: end_pulse is the end the caller asked for (otherwise max_detections cut the
    window short and the next call continues at end_pulse). detections holds the secret
    columns too (Alice's choices, Eve's flags): use for_receiver() for what Bob may see.
    """

    first_pulse: int
    end_pulse: int
    complete: bool
    detections: Detections

    def __len__(self) -> int:
        return len(self.detections)

    def __repr__(self) -> str:
        return (
            f"<DetectionBatch pulses [{self.first_pulse}, {self.end_pulse}) "
            f"detections={len(self)} complete={self.complete}>"
        )

    def for_receiver(self) -> ReceiverRecord:
        d = self.detections
        return ReceiverRecord(d.pulse, d.bob_basis, d.outcome, d.double_click)


@dataclass(frozen=True, slots=True)
class EveStatistics:
    """What Eve learned (counts only, never bits).

    Among Bob's detections: intercepted (Eve measured the pulse and resent), basis_matched
    (of those, her basis was Alice's: she knows the bit), split (she kept a photon of a
    multi-photon pulse: she learns the bit when the bases are announced), blocked (she
    blocked what the pulse carried; the click was a dark count). Over every pulse sent
    (expected values, from the model: the sampler never visits undetected pulses):
    intercepted_pulses_expected (photon-carrying pulses she measured) and
    split_pulses_expected.
    """

    intercepted_detections: int = 0
    basis_matched_detections: int = 0
    split_detections: int = 0
    blocked_detections: int = 0
    intercepted_pulses_expected: float = 0.0
    split_pulses_expected: float = 0.0


@dataclass(frozen=True, slots=True)
class OpticalLinkStatistics:
    """Running totals of one link since it was created."""

    pulses: int = 0
    detections: int = 0
    double_clicks: int = 0
    detections_per_class: tuple[int, int, int] = (0, 0, 0)
    eve: EveStatistics = field(default_factory=EveStatistics)


def _photon_carrying_fraction(config: OpticalLinkConfig) -> tuple[float, float]:
    """(P(n >= 1), P(n >= 2)) of a pulse, averaged over the intensity classes."""
    i, p = config.intensities, config.class_probabilities
    mus = (i.signal, i.decoy, i.vacuum)
    some = sum(pk * -math.expm1(-mu) for pk, mu in zip(p, mus, strict=True))
    multi = sum(pk * multi_photon_probability(mu) for pk, mu in zip(p, mus, strict=True))
    return some, multi


class OpticalLink:
    """One QKD link's optical layer in the broker (sans-IO; see the module docstring)."""

    def __init__(
        self,
        config: OpticalLinkConfig,
        *,
        alice_key: int,
        channel_key: int,
        backend: Backend | None = None,
        eve: Eavesdropper | None = None,
    ) -> None:
        if not isinstance(config, OpticalLinkConfig):
            raise OpticalLinkError(f"config must be an OpticalLinkConfig, got {type(config).__name__}")
        self._config = config
        self._alice_key = alice_key
        self._channel_key = channel_key
        self._backend = backend if backend is not None else get_backend()
        self._eve = eve if eve is not None else Eavesdropper()
        self._fibre_cut = False
        self._model = self._build()
        self._cursor = OpticsCursor()
        self._next_pulse = 0
        self._stats = OpticalLinkStatistics()

    def __repr__(self) -> str:  # no keys
        return f"<OpticalLink {self._config.length_km} km next_pulse={self._next_pulse} eve={self._eve}>"

    # --- configuration --------------------------------------------------------------
    @property
    def config(self) -> OpticalLinkConfig:
        return self._config

    @property
    def eavesdropper(self) -> Eavesdropper:
        return self._eve

    @property
    def fibre_cut(self) -> bool:
        return self._fibre_cut

    @property
    def model(self) -> OpticsModel:
        """The current sampling tables (click probability per kind, ...)."""
        return self._model

    @property
    def cursor(self) -> OpticsCursor:
        """The sampler's state (with the configuration and keys, all a checkpoint needs)."""
        return self._cursor

    @property
    def next_pulse(self) -> int:
        """First pulse not yet decided (the start of the next batch)."""
        return self._next_pulse

    def pulses_before(self, now_s: float) -> int:
        """Pulses emitted before emulated time now_s: pulse i leaves at i / pulse_rate_hz."""
        if not (now_s >= 0.0 and math.isfinite(now_s)):
            raise OpticalLinkError(f"now_s must be finite and >= 0, got {now_s!r}")
        return min(math.ceil(now_s * self._config.pulse_rate_hz), MAX_PULSE_INDEX)

    def set_eavesdropper(self, eve: Eavesdropper | None) -> None:
        """Turn Eve's switches (None: all off); applies to pulses from next_pulse on."""
        self._eve = eve if eve is not None else Eavesdropper()
        self._rebuild()

    def set_fibre_cut(self, cut: bool) -> None:
        """A cut fibre transmits nothing: Bob sees dark counts only."""
        self._fibre_cut = bool(cut)
        self._rebuild()

    def set_config(self, config: OpticalLinkConfig) -> None:
        """New physical parameters from next_pulse on (the pulse rate must not change:
        pulse indices are tied to emulated time)."""
        if config.pulse_rate_hz != self._config.pulse_rate_hz:
            raise OpticalLinkError("pulse_rate_hz cannot change during a run")
        self._config = config
        self._rebuild()

    def _build(self) -> OpticsModel:
        params = self._config.parameters(self._eve, fibre_cut=self._fibre_cut)
        return build_optics_model(params, alice_key=self._alice_key, channel_key=self._channel_key)

    def _rebuild(self) -> None:
        old = self._model
        self._model = self._build()
        c = self._cursor
        if self._model.p_max != old.p_max and c.position < self._next_pulse:
            # The pending gap draw was seen to reach past next_pulse under the old rate:
            # discard it and restart the (memoryless) candidate process at next_pulse.
            self._cursor = replace(c, ordinal=c.ordinal + 1, position=self._next_pulse)

    # --- running --------------------------------------------------------------------
    def advance(self, now_s: float, *, max_detections: int = DEFAULT_MAX_DETECTIONS) -> DetectionBatch:
        """The detections among the pulses sent before now_s not decided yet."""
        return self.advance_to_pulse(self.pulses_before(now_s), max_detections=max_detections)

    def advance_to_pulse(self, end: int, *, max_detections: int = DEFAULT_MAX_DETECTIONS) -> DetectionBatch:
        """The detections among pulses [next_pulse, end), at most max_detections of them."""
        if not isinstance(end, int) or isinstance(end, bool):
            raise OpticalLinkError(f"end must be an int pulse index, got {type(end).__name__}")
        if not self._next_pulse <= end <= MAX_PULSE_INDEX:
            raise OpticalLinkError(f"end must be in [{self._next_pulse}, 2**53], got {end}")
        if max_detections < 1:
            raise OpticalLinkError(f"max_detections must be >= 1, got {max_detections}")
        first = self._next_pulse
        det, cursor = self._backend.optics_sample(self._model, self._cursor, end, max_detections)
        complete = len(det) < max_detections or cursor.position >= end
        covered = end if complete else cursor.position
        self._cursor = cursor
        self._next_pulse = covered
        self._account(covered - first, det)
        return DetectionBatch(first, covered, complete, det)

    def _account(self, pulses: int, det: Detections) -> None:
        s, eve = self._stats, self._stats.eve
        flags = det.eve
        per_class = np.bincount(det.alice_class, minlength=3)
        f = self._eve.intercept_fraction
        some, multi = _photon_carrying_fraction(self._config)
        self._stats = OpticalLinkStatistics(
            pulses=s.pulses + pulses,
            detections=s.detections + len(det),
            double_clicks=s.double_clicks + int(np.count_nonzero(det.double_click)),
            detections_per_class=(
                s.detections_per_class[0] + int(per_class[0]),
                s.detections_per_class[1] + int(per_class[1]),
                s.detections_per_class[2] + int(per_class[2]),
            ),
            eve=EveStatistics(
                intercepted_detections=eve.intercepted_detections + _count(flags, EveFlag.INTERCEPTED),
                basis_matched_detections=eve.basis_matched_detections + _count(flags, EveFlag.BASIS_MATCHED),
                split_detections=eve.split_detections + _count(flags, EveFlag.SPLIT),
                blocked_detections=eve.blocked_detections + _count(flags, EveFlag.BLOCKED),
                intercepted_pulses_expected=eve.intercepted_pulses_expected + pulses * f * some,
                split_pulses_expected=eve.split_pulses_expected
                + (pulses * (1.0 - f) * multi if self._eve.pns else 0.0),
            ),
        )

    def statistics(self) -> OpticalLinkStatistics:
        return self._stats


def _count(flags: np.ndarray, flag: EveFlag) -> int:
    return int(np.count_nonzero(flags & np.uint8(flag)))


def pns_gain_matching(config: OpticalLinkConfig, *, pns_multi_forward: float | None = None) -> Eavesdropper:
    """A photon-number-splitting Eve who keeps the signal gain at its no-Eve value.

    The textbook PNS attack (Brassard, Lütkenhaus, Mor & Sanders, PRL 85, 1330 (2000)):
    Eve forwards the remainder of multi-photon pulses losslessly and blocks single-photon
    pulses so that Bob's signal click rate is what the fibre would give; when even blocking
    every single photon leaves the gain too high, she also blocks a fraction of the
    multi-photon pulses. The signal gain is linear in each blocking probability, so the
    solution is read off two evaluations. If lossless forwarding cannot reach the no-Eve
    gain at all (short fibres), the plain attack (nothing blocked) is returned. Against
    such an Eve the signal gain and the QBER look normal; the decoy gains do not
    (Lo, Ma & Chen, PRL 94, 230504 (2005)).
    """

    def click(eve: Eavesdropper, kind: int) -> float:
        model = build_optics_model(config.parameters(eve, fibre_cut=False), alice_key=0, channel_key=0)
        return float(model.click_probability[kind])

    def signal_gain(eve: Eavesdropper) -> float:
        return click(eve, 6)  # kind PNS * 3 + SIGNAL

    target = click(Eavesdropper(), 0)  # kind NORMAL * 3 + SIGNAL
    forward = 1.0 if pns_multi_forward is None else pns_multi_forward
    plain = Eavesdropper(pns=True, pns_multi_forward=forward)
    g0 = signal_gain(plain)
    if g0 <= target:
        return plain
    all_singles = replace(plain, pns_single_block=1.0)
    g1 = signal_gain(all_singles)
    if g1 <= target:
        return replace(plain, pns_single_block=min(1.0, (g0 - target) / (g0 - g1)))
    none_forwarded = replace(all_singles, pns_multi_forward=0.0)
    g2 = signal_gain(none_forwarded)
    t = (target - g2) / (g1 - g2)
    return replace(all_singles, pns_multi_forward=min(1.0, max(0.0, t * forward)))
