"""Errors of the key-management core that an SAE gets back (ETSI GS QKD 014 §5, §6.5).

Theory of operation
-------------------
The KME core (``nodes.kms.kme``) answers an SAE's request with either keys or a
``KmsError``. The REST layer turns it into the HTTP status and the §6.5 Error JSON
(``message`` and optional ``details``). ETSI GS QKD 014 V1.1.1 §5.2-§5.4 allow exactly
three error statuses: 400 (bad request: the caller's fault), 401 (unauthorised: the
caller may not have these keys) and 503 (error of the server side: the KME cannot
serve now, e.g. no key material). Messages and details name SAE ids, key ids, sizes and
counts only — never key bytes (CONVENTIONS 14).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = ["API_STATUSES", "KmsError"]

#: ETSI GS QKD 014 §5: the only error statuses of the API.
API_STATUSES: Final = frozenset({400, 401, 503})


class KmsError(Exception):
    """A request the KME refuses: `status` 400, 401 or 503, a `message` and optional `details`.

    Same shape as the REST layer's error (``nodes.kms.etsi014.KmsError``): constructor
    ``KmsError(status, message, details=None)``, attributes ``status``, ``message`` and
    ``details`` (a tuple of JSON objects, or None).
    """

    def __init__(self, status: int, message: str, details: Sequence[Mapping[str, Any]] | None = None) -> None:
        if status not in API_STATUSES:
            raise ValueError(f"ETSI GS QKD 014 §5 allows only 400, 401 and 503 as errors, not {status}")
        super().__init__(status, message)
        self.status: int = status
        self.message: str = message
        self.details: tuple[dict[str, Any], ...] | None = (
            tuple(dict(d) for d in details) if details is not None else None
        )

    def __str__(self) -> str:
        return f"{self.status} {self.message}"

    def __repr__(self) -> str:
        return f"KmsError({self.status}, {self.message!r})"
