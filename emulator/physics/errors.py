"""Typed errors raised by the physics models.

Every model validates its parameters and raises `PhysicsParameterError` (a
`ValueError`, so generic callers still catch it) naming the parameter and the allowed
range. Model-specific conditions get their own subclass so that the broker can map
them to a scenario validation message.
"""

from __future__ import annotations

__all__ = ["MemoryParameterError", "PhysicsParameterError"]


class PhysicsParameterError(ValueError):
    """A physical parameter is outside the range where the model is defined."""


class MemoryParameterError(PhysicsParameterError):
    """Memory coherence times are inconsistent (e.g. T2 > 2*T1) or not positive."""
