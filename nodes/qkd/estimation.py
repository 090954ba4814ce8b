"""Parameter estimation of one sifted decoy-BB84 block: decoy bounds, QBER, key length, abort.

Theory of operation
-------------------
Sifting (``nodes.qkd.sifting``) leaves both ends with the same public ``BlockCounts``:
pulses sent, detections per intensity class, and per class and basis the sifted,
disclosed and erroneous bits. ``estimate(counts, parameters)`` is a pure function of
them; both ends run it and reach the same decision.

1. *Per-class statistics* (Ma, Qi, Zhao & Lo, PRA 72, 012326 (2005) Sec. II, "Ma et
   al."): gain Q_k = detections_k / (pulses x p_k) over all of Bob's detections of the
   class, and error rate E_k = errors / disclosed bits of the class (both bases pooled;
   per basis in ``error_rates``). Vacuum and decoy bits are all disclosed, signal bits
   of the test basis too, signal bits of the key basis in a random sample.
2. *Decoy bounds* (vacuum + weak decoy, Ma et al. Eqs. (34), (35), (37), computed by
   ``emulator.physics.decoy_bounds``): Y1^L, Q1^L = mu e^-mu Y1^L, e1^U.
3. *Asymptotic reference rate* per pulse, GLLP in Ma et al.'s notation,
   R = q {-Q_mu f H2(E_mu) + Q1^L [1 - H2(e1^U)]} (``gllp_key_rate``; q and f from the
   parameters). It is what Ma et al. plot; the key actually kept uses the finite bound.
4. *Finite-key length.* Lim, Curty, Walenta, Xu & Zbinden, PRA 89, 022307 (2014) ("Lim
   et al."), Eqs. (1)-(5), via ``emulator.physics.finite_key_length``: their X basis is
   our key basis, their Z basis our test basis (n_X,k: sifted key-basis detections of
   class k; n_Z,k, m_Z,k: sifted test-basis detections and their errors, all disclosed).
   Their bounds s_X0^L, s_X1^L, phi_X^U concern *all* key-basis detections, but our key
   keeps only the signal ones that were not sampled. Which detection ends up in the key
   depends on its class (Alice's secret, which Eve cannot learn from the photon number:
   the decoy-state principle) and on the sample (drawn after the fact), so an n-photon
   key-basis detection is kept independently with probability
   ``p_keep(n) = p_mu e^-mu mu^n / (n! tau_n) x (1 - r)`` (Lim et al. Eq. (2) for tau_n;
   r the sample fraction). Hence, each with failure probability eps (Hoeffding, JASA 58,
   13 (1963), Thm. 1 for the binomial, Sec. 6 for the uniformly random subset):

       s_key,n >= p_keep(n) s_X,n - sqrt(s_X,n ln(1/eps) / 2)        (n = 0, 1)
       phi_key <= phi_X + sqrt(ln(1/eps) / (2 s_key,1))

   The first right-hand side is convex in s_X,n with its minimum at
   s* = ln(1/eps) / (8 p_keep^2); evaluating it at max(s_X,n^L, s*) keeps it a lower
   bound whatever the true s_X,n >= s_X,n^L. The key length is Lim et al.'s Eq. (1) for
   the kept bits:

       l = floor( s_key,0 + s_key,1 (1 - h(phi_key)) - lambda_EC - 6 log2(27/eps_sec) - log2(2/eps_cor) ).

   eps budget: Lim et al. split eps_sec into 21 equal terms (their App. B, Eq. (B4));
   the three estimates above add three more, each counted twice to be safe (as the
   smoothing terms are there), so every term is eps = eps_sec / 27 and Lim et al.'s
   bounds are evaluated with eps_sec' = 21 eps — hence 27 in the cost term.
   lambda_EC (the bits reconciliation disclosed) is only known after Cascade, so the
   length is a separate function, ``key_length(estimate, leaked_bits)``.
5. *Abort and alarm.* A block is aborted when the signal QBER of either basis exceeds
   ``qber_threshold`` (default 11 %: the BB84 threshold of Shor & Preskill, PRL 85, 441
   (2000), where 1 - 2 h(e) reaches 0) or when no single-photon yield can be bounded
   (Y1^L = 0: the signature of a photon-number-splitting attack, or of a fibre too long);
   both raise an ``EavesdropperAlarm`` (reason and QBER, never key bits). It is also
   aborted, without an alarm, when the counts are too few to estimate anything
   (INSUFFICIENT_STATISTICS) or when no key would survive the leak reconciliation is
   expected to cost, lambda_EC = f h(QBER) n_key (Lim et al. Sec. IV's model of the
   leak, f = ``ec_efficiency``): running Cascade on such a block could only waste key
   (NO_SECRET_KEY — e.g. a fibre beyond the maximum distance). An aborted block yields
   no key: ``key_length`` returns 0 for it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Final

from emulator.physics import (
    BB84_SIFTING_FACTOR,
    DecoyIntensities,
    FiniteKeyInput,
    FiniteKeyResult,
    IntensityCounts,
    IntensityStatistics,
    SinglePhotonBounds,
    binary_entropy,
    decoy_bounds,
    finite_key_length,
    gllp_key_rate,
    tau_n,
)

from .sifting import N_CLASSES, BlockCounts

__all__ = [
    "ALARM_REASONS",
    "EPSILON_TERMS",
    "SHOR_PRESKILL_QBER",
    "AbortDecision",
    "AbortReason",
    "EavesdropperAlarm",
    "Estimate",
    "EstimationError",
    "EstimationParameters",
    "KeyBounds",
    "estimate",
    "key_length",
    "thinned_lower_bound",
]

#: BB84 with one-way post-processing yields key while 1 - 2 h(e) > 0, i.e. e < 11.0 %
#: (Shor & Preskill, PRL 85, 441 (2000)).
SHOR_PRESKILL_QBER: Final[float] = 0.11
#: eps_sec is split into this many equal terms: Lim et al.'s 21 plus 2 x 3 for the
#: signal-only key (module docstring, step 4).
EPSILON_TERMS: Final[float] = 27.0
_LIM_TERMS: Final[float] = 21.0


class EstimationError(ValueError):
    """Bad arguments to parameter estimation (the caller's fault)."""


def _probability(name: str, value: float, *, open_interval: bool = False) -> float:
    v = float(value)
    ok = 0.0 < v < 1.0 if open_interval else 0.0 <= v <= 1.0
    if not ok:
        raise EstimationError(f"{name} must be in {'(0, 1)' if open_interval else '[0, 1]'}, got {value!r}")
    return v


@dataclasses.dataclass(frozen=True, slots=True)
class EstimationParameters:
    """The link's intensities and the security targets of estimation.

    intensities: mean photon numbers (signal mu > decoy nu + vacuum, decoy > vacuum);
    qber_threshold: abort above it (default: Shor–Preskill's 11 %); epsilon_sec,
    epsilon_cor: Lim et al.'s secrecy and correctness parameters (the scenario's);
    ec_efficiency (f): of the asymptotic reference rate and of the expected leak that
    decides NO_SECRET_KEY; sifting_factor (q): of the asymptotic reference rate only.
    """

    intensities: DecoyIntensities
    qber_threshold: float = SHOR_PRESKILL_QBER
    epsilon_sec: float = 1e-10
    epsilon_cor: float = 1e-15
    ec_efficiency: float = 1.22
    sifting_factor: float = BB84_SIFTING_FACTOR

    def __post_init__(self) -> None:
        if not isinstance(self.intensities, DecoyIntensities):
            raise EstimationError(f"intensities must be DecoyIntensities, got {type(self.intensities).__name__}")
        i = self.intensities
        if not (i.signal > i.decoy + i.vacuum and i.decoy > i.vacuum):
            raise EstimationError(
                f"the decoy bounds need signal > decoy + vacuum, got {i.signal!r}, {i.decoy!r}, {i.vacuum!r}"
            )
        _probability("qber_threshold", self.qber_threshold)
        _probability("epsilon_sec", self.epsilon_sec, open_interval=True)
        _probability("epsilon_cor", self.epsilon_cor, open_interval=True)
        if not (math.isfinite(self.ec_efficiency) and self.ec_efficiency >= 1.0):
            raise EstimationError(f"ec_efficiency must be finite and >= 1, got {self.ec_efficiency!r}")
        if not 0.0 < self.sifting_factor <= 1.0:
            raise EstimationError(f"sifting_factor must be in (0, 1], got {self.sifting_factor!r}")

    @property
    def mean_photon_numbers(self) -> tuple[float, float, float]:
        i = self.intensities
        return (i.signal, i.decoy, i.vacuum)


class AbortReason(enum.Enum):
    """Why a block yields no key (see the module docstring, step 5)."""

    QBER_ABOVE_THRESHOLD = "qber_above_threshold"
    NO_SINGLE_PHOTON_BOUND = "no_single_photon_bound"
    INSUFFICIENT_STATISTICS = "insufficient_statistics"
    NO_SECRET_KEY = "no_secret_key"


#: Reasons that raise an EavesdropperAlarm (the others only abort the block).
ALARM_REASONS: Final[frozenset[AbortReason]] = frozenset(
    {AbortReason.QBER_ABOVE_THRESHOLD, AbortReason.NO_SINGLE_PHOTON_BOUND}
)


@dataclasses.dataclass(frozen=True, slots=True)
class AbortDecision:
    """Empty `reasons`: the block goes on to reconciliation; otherwise it is discarded."""

    reasons: tuple[AbortReason, ...] = ()

    @property
    def abort(self) -> bool:
        return bool(self.reasons)

    @property
    def alarm(self) -> bool:
        return any(r in ALARM_REASONS for r in self.reasons)


@dataclasses.dataclass(frozen=True, slots=True)
class EavesdropperAlarm:
    """Event: block `block_id` shows what an eavesdropper would cause (counts only).

    qber: the larger signal QBER of the two bases; single_photon_yield_lower: Y1^L.
    """

    block_id: int
    reason: AbortReason
    qber: float
    qber_threshold: float
    single_photon_yield_lower: float


@dataclasses.dataclass(frozen=True, slots=True)
class KeyBounds:
    """Finite-key bounds for the bits kept as key (module docstring, step 4).

    lim: Lim et al.'s bounds over all key-basis detections (lambda_EC = 0, eps_sec' =
    21 eps_sec / 27); vacuum_events_lower, single_photon_events_lower: s_key,0^L and
    s_key,1^L among the kept bits; phase_error_upper: phi_key^U (None without single-
    photon events); security_cost_bits: 6 log2(27/eps_sec) + log2(2/eps_cor).
    """

    key_bits: int
    keep_probability_vacuum: float
    keep_probability_single: float
    vacuum_events_lower: float
    single_photon_events_lower: float
    phase_error_upper: float | None
    security_cost_bits: float
    lim: FiniteKeyResult

    def secret_bits_before_leak(self) -> float:
        """s_key,0 + s_key,1 (1 - h(phi_key)) - security cost: Eq. (1) without lambda_EC."""
        entropy = 0.0
        if self.phase_error_upper is not None:
            entropy = self.single_photon_events_lower * (
                1.0 - float(binary_entropy(min(self.phase_error_upper, 0.5)))
            )
        return self.vacuum_events_lower + entropy - self.security_cost_bits


@dataclasses.dataclass(frozen=True, slots=True)
class Estimate:
    """Everything estimation learnt about a block (public numbers only).

    statistics: (signal, decoy, vacuum) gains Q_k and pooled error rates E_k;
    error_rates: [class][basis] (0 where nothing was disclosed); bounds: Y0^L, Y1^L,
    Q1^L, e1^U; qber: signal QBER of the key basis from the disclosed sample (what
    Cascade's block sizes use), qber_sample_bits its sample size; test_basis_qber: the
    signal QBER of the test basis; asymptotic_rate_per_pulse: the GLLP reference;
    key: finite-key bounds of the kept bits (None when the counts do not allow them);
    expected_leak_bits: f h(qber) key_bits, the leak the NO_SECRET_KEY test assumes.
    """

    block_id: int
    counts: BlockCounts
    parameters: EstimationParameters
    statistics: tuple[IntensityStatistics, IntensityStatistics, IntensityStatistics]
    error_rates: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    bounds: SinglePhotonBounds
    qber: float
    qber_sample_bits: int
    test_basis_qber: float
    asymptotic_rate_per_pulse: float
    key: KeyBounds | None
    expected_leak_bits: float
    decision: AbortDecision
    alarm: EavesdropperAlarm | None

    @property
    def gains(self) -> tuple[float, float, float]:
        return (self.statistics[0].gain, self.statistics[1].gain, self.statistics[2].gain)

    @property
    def max_key_length_bits(self) -> int:
        """The key length if reconciliation leaked nothing (an upper bound on key_length)."""
        return key_length(self, 0)

    @property
    def expected_key_length_bits(self) -> int:
        """The key length if reconciliation leaks expected_leak_bits."""
        return key_length(self, self.expected_leak_bits)


# ------------------------------------------------------------------------- formulas


def thinned_lower_bound(events_lower: float, keep_probability: float, epsilon: float) -> float:
    """A lower bound, failing with probability <= epsilon, on how many of s events survive
    independent thinning with probability p, given only s >= events_lower.

    Hoeffding (1963) Thm. 1: P[Bin(s, p) <= p s - t] <= exp(-2 t^2 / s), so t =
    sqrt(s ln(1/eps) / 2). f(s) = p s - t(s) is convex with its minimum at
    s* = ln(1/eps) / (8 p^2); min over s >= s^L is f(max(s^L, s*)), clipped at 0.
    """
    s = float(events_lower)
    p = float(keep_probability)
    if not (s >= 0.0 and 0.0 <= p <= 1.0 and 0.0 < epsilon < 1.0):
        raise EstimationError("thinned_lower_bound needs s >= 0, p in [0, 1], epsilon in (0, 1)")
    if p == 0.0 or s == 0.0:
        return 0.0
    log_term = math.log(1.0 / epsilon)
    s_eff = max(s, log_term / (8.0 * p * p))
    return max(p * s_eff - math.sqrt(s_eff * log_term / 2.0), 0.0)


def _rate(errors: int, total: int) -> float:
    return errors / total if total > 0 else 0.0


def _key_bounds(counts: BlockCounts, parameters: EstimationParameters) -> KeyBounds | None:
    p = counts.class_probabilities
    if any(pk <= 0.0 for pk in p):
        return None
    mus = parameters.mean_photon_numbers
    k_basis, t_basis = int(counts.key_basis), counts.test_basis
    for c in range(N_CLASSES):
        if counts.disclosed[c][t_basis] != counts.sifted[c][t_basis]:
            raise EstimationError("every test-basis bit must be disclosed (Lim et al.'s m_Z counts all errors)")
    classes = [
        IntensityCounts(
            mean_photon_number=mus[c],
            probability=p[c],
            n_x=float(counts.sifted[c][k_basis]),
            n_z=float(counts.sifted[c][t_basis]),
            m_z=float(counts.errors[c][t_basis]),
        )
        for c in range(N_CLASSES)
    ]
    eps = parameters.epsilon_sec / EPSILON_TERMS
    lim = finite_key_length(
        FiniteKeyInput(
            signal=classes[0],
            decoy=classes[1],
            vacuum=classes[2],
            epsilon_sec=_LIM_TERMS * eps,
            epsilon_cor=parameters.epsilon_cor,
            ec_leakage_bits=0.0,
        )
    )
    mu, keep_sample = mus[0], 1.0 - counts.sample_fraction
    # p_keep(n) = p_mu e^-mu mu^n / (n! tau_n) x (1 - r) (module docstring, step 4).
    keep0 = min(p[0] * math.exp(-mu) / tau_n(0, mus, p), 1.0) * keep_sample
    keep1 = min(p[0] * math.exp(-mu) * mu / tau_n(1, mus, p), 1.0) * keep_sample
    s0 = min(thinned_lower_bound(lim.s_x0_lower, keep0, eps), float(counts.key_bits))
    s1 = min(thinned_lower_bound(lim.s_x1_lower, keep1, eps), float(counts.key_bits) - s0)
    phase: float | None = None
    if lim.phase_error_upper is not None and s1 > 0.0:
        # Hoeffding (1963) Sec. 6: a uniformly random subset of size s1 of the single-photon
        # events has a phase error rate above phi_X + t with probability <= exp(-2 s1 t^2).
        phase = min(lim.phase_error_upper + math.sqrt(math.log(1.0 / eps) / (2.0 * s1)), 1.0)
    return KeyBounds(
        key_bits=counts.key_bits,
        keep_probability_vacuum=keep0,
        keep_probability_single=keep1,
        vacuum_events_lower=s0,
        single_photon_events_lower=s1,
        phase_error_upper=phase,
        security_cost_bits=lim.security_cost_bits,
        lim=lim,
    )


def estimate(block_counts: BlockCounts, parameters: EstimationParameters) -> Estimate:
    """Estimate a block's parameters and decide whether it goes on (pure function)."""
    if not isinstance(block_counts, BlockCounts):
        raise EstimationError(f"block_counts must be BlockCounts, got {type(block_counts).__name__}")
    if not isinstance(parameters, EstimationParameters):
        raise EstimationError(f"parameters must be EstimationParameters, got {type(parameters).__name__}")
    c = block_counts
    mus = parameters.mean_photon_numbers
    k_basis, t_basis = int(c.key_basis), c.test_basis
    pulses = c.pulses_per_class
    stats = []
    for k in range(N_CLASSES):
        gain = min(c.detections[k] / pulses[k], 1.0) if pulses[k] > 0 else 0.0
        error = _rate(sum(c.errors[k]), sum(c.disclosed[k]))
        stats.append(IntensityStatistics(mean_photon_number=mus[k], gain=gain, error_rate=error))
    statistics = (stats[0], stats[1], stats[2])
    per_basis = tuple(
        (_rate(c.errors[k][0], c.disclosed[k][0]), _rate(c.errors[k][1], c.disclosed[k][1])) for k in range(N_CLASSES)
    )
    bounds = decoy_bounds(*statistics)
    qber = per_basis[0][k_basis]
    test_qber = per_basis[0][t_basis]
    rate = float(
        gllp_key_rate(
            statistics[0].gain,
            statistics[0].error_rate,
            bounds.gain_lower,
            bounds.error_rate_upper,
            ec_efficiency=parameters.ec_efficiency,
            sifting_factor=parameters.sifting_factor,
        )
    )
    key = _key_bounds(c, parameters)

    reasons: list[AbortReason] = []
    sample = c.disclosed[0][k_basis]
    if c.pulses == 0 or sample == 0 or any(d == 0 for d in c.detections[:2]) or key is None:
        reasons.append(AbortReason.INSUFFICIENT_STATISTICS)
    worst_qber = max(qber, test_qber)
    if worst_qber > parameters.qber_threshold:
        reasons.append(AbortReason.QBER_ABOVE_THRESHOLD)
    if bounds.yield_lower <= 0.0:
        reasons.append(AbortReason.NO_SINGLE_PHOTON_BOUND)
    # Lim et al. Sec. IV: lambda_EC = f_EC n h(e_obs), the leak a reconciliation of
    # efficiency f is expected to cost.
    expected_leak = parameters.ec_efficiency * float(binary_entropy(min(qber, 0.5))) * c.key_bits
    if key is None or math.floor(key.secret_bits_before_leak() - expected_leak) <= 0:
        reasons.append(AbortReason.NO_SECRET_KEY)
    decision = AbortDecision(tuple(reasons))
    alarm = None
    alarm_reason = next((r for r in reasons if r in ALARM_REASONS), None)
    if alarm_reason is not None:
        alarm = EavesdropperAlarm(
            block_id=c.block_id,
            reason=alarm_reason,
            qber=worst_qber,
            qber_threshold=parameters.qber_threshold,
            single_photon_yield_lower=bounds.yield_lower,
        )
    return Estimate(
        block_id=c.block_id,
        counts=c,
        parameters=parameters,
        statistics=statistics,
        error_rates=per_basis,  # type: ignore[arg-type]
        bounds=bounds,
        qber=qber,
        qber_sample_bits=sample,
        test_basis_qber=test_qber,
        asymptotic_rate_per_pulse=rate,
        key=key,
        expected_leak_bits=expected_leak,
        decision=decision,
        alarm=alarm,
    )


def key_length(estimate: Estimate, leaked_bits: float) -> int:
    """Secret bits the block's kept key yields after reconciliation leaked `leaked_bits`
    (lambda_EC: Cascade's disclosed parities): Lim et al. Eq. (1) for the kept bits
    (module docstring, step 4), floored, >= 0; 0 for an aborted block."""
    leak = float(leaked_bits)
    if not (leak >= 0.0 and math.isfinite(leak)):
        raise EstimationError(f"leaked_bits must be finite and >= 0, got {leaked_bits!r}")
    if estimate.key is None or estimate.decision.abort:
        return 0
    return max(int(math.floor(estimate.key.secret_bits_before_leak() - leak)), 0)
