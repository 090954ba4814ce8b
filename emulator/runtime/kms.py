"""The orchestrator's side of key management (DESIGN §8): credentials, `kms_start`, metrics.

Theory of operation
-------------------
A scenario with a `kms` section gets, per run:

1. a certificate authority (`emulator.certs.RunCa`) saved in ``RUN/certs`` — ``ca.key``
   0600 in a 0700 directory, so ``qnetem certs RUN --sae ID`` can issue a certificate
   for an outside application while the run goes on;
2. per KME node (every endpoint of a QKD link): a KME certificate (server and client
   authentication: the HTTPS servers, and the signatures of the hybrid key exchange),
   and the SAE certificates of the SAEs it serves — the node's own applications make
   their ETSI 014 calls with them;
3. a fingerprint salt (16 random bytes, per run): each KME reports every delivery as
   (key ID, SAE, HMAC-SHA-256(salt, key)[:8]) — never the key — so the orchestrator can
   count keys whose two ends differ (`key_mismatches`) and keys an SAE got twice
   (`duplicate_deliveries`) without seeing a key.

`KmsSetup.config_for(node)` is the `kms_start` config of one node (secret: it holds the
KME's private key; the control session never logs it); `started()` records where its
servers listen; `manifest()` is ``RUN/kms.json`` (URLs and SAE -> node, no secrets).
`kms_metrics(node_stats)` turns the nodes' `stats.kms` sections into the run's `kms`
metrics (scenario metric scope `kms`).
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emulator.certs import RunCa

from .orchestrator import KmsPlan

__all__ = ["KMS_MANIFEST", "KmsSetup", "kms_metrics"]

KMS_MANIFEST = "kms.json"
CERTS_DIR = "certs"


class KmsSetup:
    """Credentials and endpoints of one run's KMEs."""

    def __init__(self, plan: KmsPlan, run_name: str, run_dir: Path) -> None:
        self.plan = plan
        self.run_dir = run_dir
        self.ca = RunCa.create(run_name)
        self.ca.save(run_dir / CERTS_DIR)
        self._salt = secrets.token_bytes(16)
        self._kmes: dict[str, Any] = {}  # node -> Credential, issued at its first kms_start
        self._saes = {sae: self.ca.issue_sae(sae) for sae in plan.saes}
        self.endpoints: dict[str, dict[str, str]] = {}

    def __repr__(self) -> str:
        return f"<KmsSetup kmes={sorted(self._kmes)} saes={len(self._saes)}>"

    def config_for(self, node: str, *, bind_host: str | None = None, reach_host: str | None = None) -> dict[str, Any]:
        """The `kms_start` config of `node` (secret: its private keys). `bind_host`: where
        its servers listen (default: the scenario's `kms.host`); `reach_host`: the
        address clients reach it at, when that is an IP other than 127.0.0.1 (a
        container's), put into its certificate."""
        extra = [reach_host] if reach_host is not None and _is_ip(reach_host) else []
        kme = self._kmes.get(node)
        if kme is None or extra:
            kme = self._kmes[node] = self.ca.issue_kme(node, extra_ips=extra)
        config = self.plan.config()
        if bind_host is not None:
            config["host"] = bind_host
        return {
            **config,
            "node": node,
            "kme_cert_pem": kme.cert_pem,
            "kme_key_pem": kme.key_pem,
            "ca_pem": kme.ca_pem,
            "fingerprint_salt": self._salt,
            "sae_credentials": {
                sae: {"cert_pem": cred.cert_pem, "key_pem": cred.key_pem}
                for sae, cred in self._saes.items()
                if self.plan.saes[sae] == node
            },
        }

    def started(self, node: str, host: str, etsi014_port: int, skip_port: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        self.endpoints[node] = {
            "etsi014": f"https://{shown}:{etsi014_port}",
            "skip": f"https://{shown}:{skip_port}",
        }

    def manifest(self) -> dict[str, Any]:
        """``RUN/kms.json``: where each KME listens and which KME serves each SAE."""
        return {
            "kmes": {node: dict(self.endpoints[node]) for node in self.plan.kme_nodes if node in self.endpoints},
            "saes": dict(self.plan.saes),
            "ca": f"{CERTS_DIR}/ca.pem",
            "certs_command": "qnetem certs RUN_DIR --sae SAE_ID --out DIR",
        }

    def write_manifest(self) -> Path:
        path = self.run_dir / KMS_MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.manifest(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


#: Run metric -> the KME statistics counter summed over the KMEs (nodes/kms/kme.py
#: `KmeStatistics`, plus the service's `kms_errors`).
_COUNTERS = {
    "keys_relayed": "keys_confirmed",  # relays (one hop or more) confirmed end to end
    "relay_failures": "relays_failed",
    "reroutes": "reroutes",
    "pqc_fallbacks": "pqc_fallbacks",
    "kms_errors": "kms_errors",
}


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _deliveries(stats: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    out = []
    for row in stats.get("deliveries") or ():
        try:
            out.append((str(row["key_id"]), str(row["sae"]), str(row["role"]), str(row["fp"])))
        except (KeyError, TypeError):
            continue
    return out


def kms_metrics(node_stats: Mapping[str, Any]) -> dict[str, float]:
    """The run's `kms` metrics from every node's `stats` (nodes without `kms` are skipped).

    keys_delivered: key IDs handed to a master SAE; keys_matched / key_mismatches: key
    IDs delivered to two or more parties whose fingerprints agree / differ;
    duplicate_deliveries: (key ID, SAE) deliveries beyond the first; the rest are sums
    of the KMEs' counters.
    """
    parties: dict[str, set[str]] = defaultdict(set)  # key ID -> the fingerprints reported
    per_key: dict[str, set[str]] = defaultdict(set)  # key ID -> the SAEs it went to
    seen: Counter[tuple[str, str]] = Counter()
    masters: set[str] = set()
    sums: Counter[str] = Counter()
    found = False
    for stats in node_stats.values():
        if not isinstance(stats, Mapping) or not isinstance(stats.get("kms"), Mapping):
            continue
        found = True
        kms = stats["kms"]
        for key_id, sae, role, fp in _deliveries(kms):
            parties[key_id].add(fp)
            per_key[key_id].add(sae)
            seen[(key_id, sae)] += 1
            if role == "master":
                masters.add(key_id)
        counters = kms.get("counters") or {}
        for name, counter in _COUNTERS.items():
            value = counters.get(counter)
            if isinstance(value, int | float) and not isinstance(value, bool):
                sums[name] += value
    if not found:
        return {}
    both = [key_id for key_id, saes in per_key.items() if len(saes) >= 2]
    mismatched = [key_id for key_id in both if len(parties[key_id]) > 1]
    return {
        "keys_delivered": float(len(masters)),
        "keys_matched": float(len(both) - len(mismatched)),
        "key_mismatches": float(len(mismatched)),
        "duplicate_deliveries": float(sum(n - 1 for n in seen.values() if n > 1)),
        **{name: float(sums[name]) for name in _COUNTERS},
    }

