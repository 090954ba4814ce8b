"""The per-node key store of the key-management layer: SQLite, crash-safe, zeroising (DESIGN §8).

Theory of operation
-------------------
One ``KeyStore`` wraps one SQLite database file under the node's data directory. It holds
two kinds of secret material:

1. **Link material** — the final key of every QKD link of this node, appended block by
   block (``add_link_block``). Both ends of a link append the same blocks in the same
   order, so both hold the same bytes. Each block is split: the first ``len // 2`` bytes
   go to the stream *owned* by the lower node name of the pair (string comparison), the
   rest to the stream owned by the higher name. A node consumes only from the front of
   the stream it owns (``take_own``) and tells the peer the position it took from; the
   peer consumes the same bytes from its copy of that stream (``take_peer``). Why split?
   Two ends taking from one shared stream would race for the same bytes and need a
   round of agreement per take; with one owner per stream every take is decided locally,
   and the peer only follows. Positions are byte offsets counted from 0 over everything
   ever added to a stream. The follower's rules: ``pos`` below its front is a replay or
   a duplicate (``AlreadyTaken``); bytes not yet arrived give ``NotYetAvailable`` (the
   caller retries once the block is in); ``pos`` above the front means the owner took
   bytes the follower never heard about (a lost message) — those bytes are useless to
   both ends now, so they are skipped and zeroised. A failed call changes nothing.

2. **KME-pair keys** (table ``keys``) — keys identical at two KMEs, with UUID key ids
   created by the caller (the KME core), per peer KME and per *owner* (the KME that may
   assign it to an SAE, so the two ends never assign the same key twice).

Key life cycle (a state machine as a table; ``set_state`` enforces it):

    ============  =================================  ==========================================
    state         reached by                         may go to
    ============  =================================  ==========================================
    PENDING       put_key(state=PENDING)             READY, ASSIGNED (set_state); WITHDRAWN
    READY         put_key / set_state                ASSIGNED (take_ready, set_state); WITHDRAWN
    ASSIGNED      take_ready / set_state             DELIVERED (deliver, last party); WITHDRAWN
    DELIVERED     deliver (every party served)       — (tombstone)
    WITHDRAWN     drop_key                           — (tombstone)
    ============  =================================  ==========================================

``WITHDRAWN`` is this module's addition to the four shared states: a key dropped without
being delivered (expired, relay aborted) stays distinguishable from a delivered one.

**Parties.** An ASSIGNED key carries ``parties``: the SAEs that may fetch *this node's
copy*. ``deliver(key_id, sae)`` raises ``NotAParty`` for anyone else and ``KeyConsumed``
for a party served before; when the last party is served the key is zeroised and becomes
DELIVERED. Callers may pass ``parties`` explicitly (required when the parties are not the
default, e.g. multicast whose slave SAEs sit behind different KMEs). Default when omitted:
at the owner (the master side, ``owner == node``) the master SAE alone; at the other end
the slave SAEs; for a key whose both ends are this node (``peer_kme == node``) the master
and the slaves. ``take_ready`` without SAEs leaves ``parties`` empty: such a key cannot
be delivered until ``set_state(..., ASSIGNED, master_sae=...)`` names them.

**Tombstones.** A delivered or dropped key keeps its row (id, peer, owner, size, parties,
who got it) with the key bytes NULL. So ``get_key`` says ``KeyConsumed`` instead of
"unknown", ``deliver`` can never hand it out again, and ``put_key`` refuses to resurrect
the id. Tombstones hold names and counts only.

Crash safety
------------
Every mutating call is one SQLite transaction (``BEGIN IMMEDIATE`` … ``COMMIT``) or joins
the caller's ``transaction()`` (nested calls become SAVEPOINTs, so a failing inner call
rolls back only itself — "nothing changed" holds inside a batch too), and it returns
only after the commit. In WAL mode a transaction is committed exactly when its commit
frame is in the WAL; after a crash, frames past the last valid commit frame (salts and
cumulative checksums) are ignored (https://sqlite.org/wal.html §2 "How WAL Works";
https://sqlite.org/fileformat2.html#the_write_ahead_log). So a kill -9 at any moment leaves either the whole
call or none of it. Transactions survive an application crash in any journal mode;
``PRAGMA synchronous=FULL`` additionally fsyncs the WAL at every commit so they survive
an OS crash or power loss (https://sqlite.org/pragma.html#pragma_synchronous).
``deliver`` marks the delivery, zeroises and commits *before* it returns the bytes: a
crash between commit and hand-over loses that key for the SAE (at-most-once) but never
hands it out twice. ``BEGIN IMMEDIATE`` takes the write lock up front
(https://sqlite.org/lang_transaction.html), so connections of several ``KeyStore``
objects on one file serialise through the busy timeout
(https://sqlite.org/pragma.html#pragma_busy_timeout) and never deadlock on a lock
upgrade; readers never block in WAL mode (https://sqlite.org/wal.html §2.2
"Concurrency"). Within one object a re-entrant lock serialises threads on the shared
connection (``check_same_thread=False``).

Zeroisation
-----------
Consumed link bytes and delivered or dropped keys are first overwritten with zeros of the
same length (``zeroblob``), then the row is deleted or its blob NULLed, in the same
transaction. The overwrite alone does not scrub the file: SQLite moves cells when it
rebalances b-tree pages and leaves older copies in freed space. What removes every copy
is ``PRAGMA secure_delete=ON``, which zeroes freed cell space and freed pages
(https://sqlite.org/pragma.html#pragma_secure_delete; ``ON`` rather than ``FAST``, which
leaves freelist pages unscrubbed) — the unit tests fail without it. In WAL mode older page
images stay in the ``-wal`` file until a checkpoint copies the current pages back and
the log is reset (https://sqlite.org/wal.html §2.1 "Checkpointing", §6 "Avoiding
Excessively Large WAL Files"): ``checkpoint()`` runs ``PRAGMA wal_checkpoint(TRUNCATE)``
(https://sqlite.org/pragma.html#pragma_wal_checkpoint), and ``journal_size_limit=0``
truncates the log each time SQLite resets it
(https://sqlite.org/pragma.html#pragma_journal_size_limit). The node shell should call
``checkpoint()`` now and then (e.g. when idle). Out of scope: copies in Python ``bytes``
objects handed to callers (immutable; freed by the interpreter) and blocks that the file
system or a flash translation layer keeps.

Key bytes never appear in a repr, an exception or the statistics — ids, names, sizes and
counts only. ``link_digest`` is a hash chain over the per-block SHA-256 (FIPS 180-4 §6.2)
stored at add time; it is an audit and test aid, not for reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import math
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence

__all__ = [
    "KEY_STORE_FILE",
    "ORIGINS",
    "SCHEMA_VERSION",
    "AlreadyTaken",
    "KeyConsumed",
    "KeyExhausted",
    "KeyNotAssigned",
    "KeyNotFound",
    "KeyState",
    "KeyStore",
    "KeyStoreError",
    "LinkStatistics",
    "NotAParty",
    "NotYetAvailable",
    "StoredKey",
]

SCHEMA_VERSION = 1
ORIGINS = frozenset({"link", "relay", "pqc", "hybrid", "local"})

_CHUNK_BYTES = 1024  # link material is stored in chunks this big: a take rewrites at most ~2
_MAX_NAME_CHARS = 256


#: The store's file name in a node's data directory.
KEY_STORE_FILE = "kms.sqlite"


class KeyStoreError(Exception):
    """The caller misused the store (bad arguments, illegal state change, duplicate id)."""


class KeyExhausted(KeyStoreError):
    """Not enough link material or READY keys; nothing changed."""


class NotYetAvailable(KeyStoreError):
    """take_peer: the bytes at the position have not arrived yet; nothing changed."""


class AlreadyTaken(KeyStoreError):
    """take_peer: the position is below the stream front (replay or duplicate); nothing changed."""


class KeyNotFound(KeyStoreError):
    """No key with this id (malformed ids included)."""


class KeyConsumed(KeyNotFound):
    """The key was delivered (to this party, or to all) or withdrawn; it is never handed out again."""


class NotAParty(KeyStoreError):
    """deliver: the SAE is not one of the parties the key was assigned to."""


class KeyNotAssigned(KeyStoreError):
    """deliver: the key is not ASSIGNED to any party yet (PENDING, READY, or no parties named)."""


class KeyState(enum.Enum):
    PENDING = "pending"
    READY = "ready"
    ASSIGNED = "assigned"
    DELIVERED = "delivered"
    WITHDRAWN = "withdrawn"  # dropped without delivery (tombstone); see the module docstring


_TOMBSTONES = frozenset({KeyState.DELIVERED, KeyState.WITHDRAWN})
# set_state's table (deliver and drop_key make the tombstones).
_TRANSITIONS: dict[KeyState, frozenset[KeyState]] = {
    KeyState.PENDING: frozenset({KeyState.PENDING, KeyState.READY, KeyState.ASSIGNED}),
    KeyState.READY: frozenset({KeyState.READY, KeyState.ASSIGNED}),
    KeyState.ASSIGNED: frozenset({KeyState.ASSIGNED}),  # new parties only while nobody was served
    KeyState.DELIVERED: frozenset(),
    KeyState.WITHDRAWN: frozenset(),
}


@dataclasses.dataclass(frozen=True, slots=True)
class StoredKey:
    """One KME-pair key; `key` (bytes) is left out of the repr.

    `parties` (the SAEs that may fetch this node's copy) comes last so that positional
    construction follows the shared spec.
    """

    key_id: str
    peer_kme: str
    size_bits: int
    state: KeyState
    owner: str
    origin: str
    master_sae: str | None
    slave_saes: tuple[str, ...]
    delivered_to: tuple[str, ...]
    created_s: float
    key: bytes = dataclasses.field(repr=False)
    parties: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class LinkStatistics:
    """Counts only, in bytes; fronts are byte offsets into the streams (see the module docstring)."""

    peer: str
    blocks: int
    own_added_bytes: int
    own_taken_bytes: int
    own_available_bytes: int
    peer_added_bytes: int
    peer_taken_bytes: int
    peer_skipped_bytes: int
    peer_available_bytes: int

    @property
    def own_front_bytes(self) -> int:
        return self.own_taken_bytes

    @property
    def peer_front_bytes(self) -> int:
        return self.peer_taken_bytes + self.peer_skipped_bytes


_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE store_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE link_blocks (
    peer TEXT NOT NULL,
    block_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,              -- add order per peer
    n_bytes INTEGER NOT NULL,
    sha256 BLOB NOT NULL,              -- of the whole block, for link_digest
    added_s REAL NOT NULL,
    PRIMARY KEY (peer, block_id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX link_blocks_seq ON link_blocks (peer, seq);
CREATE TABLE link_streams (
    peer TEXT NOT NULL,
    own INTEGER NOT NULL,              -- 1: the stream this node owns, 0: the peer's
    added_bytes INTEGER NOT NULL,
    taken_bytes INTEGER NOT NULL,
    skipped_bytes INTEGER NOT NULL,    -- front = taken + skipped
    PRIMARY KEY (peer, own)
) WITHOUT ROWID;
CREATE TABLE link_chunks (            -- exactly the bytes [front, added) of each stream
    id INTEGER PRIMARY KEY,
    peer TEXT NOT NULL,
    own INTEGER NOT NULL,
    start_pos INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE UNIQUE INDEX link_chunks_pos ON link_chunks (peer, own, start_pos);
CREATE TABLE keys (
    id INTEGER PRIMARY KEY,            -- insertion order breaks created_s ties
    key_id TEXT NOT NULL UNIQUE,
    peer_kme TEXT NOT NULL,
    owner TEXT NOT NULL,
    origin TEXT NOT NULL,
    size_bits INTEGER NOT NULL,
    state TEXT NOT NULL,
    master_sae TEXT,
    slave_saes TEXT NOT NULL,          -- JSON arrays of SAE ids
    parties TEXT NOT NULL,
    delivered_to TEXT NOT NULL,
    created_s REAL NOT NULL,
    key BLOB,                          -- NULL exactly for tombstones
    CHECK ((key IS NULL) = (state IN ('delivered', 'withdrawn')))
);
CREATE INDEX keys_pick ON keys (peer_kme, owner, state, size_bits, created_s, id);
"""

_KEY_COLUMNS = (
    "id, key_id, peer_kme, owner, origin, size_bits, state, master_sae, slave_saes, parties, "
    "delivered_to, created_s, key"
)


# --- argument checks ------------------------------------------------------------------


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_NAME_CHARS:
        raise KeyStoreError(f"{what} must be a non-empty string of at most {_MAX_NAME_CHARS} characters")
    return value


def _names(values: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(values, str):
        raise KeyStoreError(f"{what} must be a sequence of names, not one string")
    return tuple(dict.fromkeys(_name(v, what) for v in values))


def _count(value: object, what: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KeyStoreError(f"{what} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _secret(value: object, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise KeyStoreError(f"{what} must be bytes, got {type(value).__name__}")
    return bytes(value)


def _time_s(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KeyStoreError(f"now must be a finite number of seconds, got {type(value).__name__}")
    return float(value)


def _new_key_id(value: object) -> str:
    """Key ids stored must be canonical UUID strings (lower-case, hyphenated): one spelling per key."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            if str(uuid.UUID(value)) == value:
                return value
    raise KeyStoreError(f"key_id must be a canonical UUID string, got {_show(value)}")


def _lookup_key_id(value: object) -> str:
    """Ids to look up are normalised (an SAE may upper-case them); anything else is unknown."""
    if isinstance(value, str) and len(value) <= 64:
        with contextlib.suppress(ValueError):
            return str(uuid.UUID(value))
    raise KeyNotFound(f"no key with id {_show(value)} (not a UUID)")


def _show(value: object) -> str:
    """A short repr of an untrusted id for messages (ids are not secret, but may be junk)."""
    text = repr(value) if isinstance(value, str) else type(value).__name__
    return text if len(text) <= 70 else text[:67] + "..."


def _state(value: object) -> KeyState:
    if not isinstance(value, KeyState):
        raise KeyStoreError(f"state must be a KeyState, got {_show(value)}")
    return value


def _dump(names: Sequence[str]) -> str:
    return json.dumps(list(names))


def _load(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


class KeyStore:
    """The key store of node `node` in the SQLite file `path` (see the module docstring).

    `path` may be ":memory:" (tests; no WAL then). Files are opened in WAL mode with
    synchronous=FULL and secure_delete=ON; a file created for one node refuses another.
    Methods are thread-safe; one connection per object.
    """

    def __init__(self, path: str | os.PathLike[str], node: str, *, busy_timeout_s: float = 30.0) -> None:
        self._node = _name(node, "node")
        self._path = os.fspath(path)
        self._lock = threading.RLock()
        self._depth = 0
        self._conn: sqlite3.Connection | None = None
        in_memory = self._path in (":memory:", "")
        conn = sqlite3.connect(
            self._path, timeout=float(busy_timeout_s), isolation_level=None, check_same_thread=False
        )
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if not in_memory and str(mode).lower() != "wal":
                raise KeyStoreError(f"cannot put {self._path!r} in WAL mode (journal_mode is {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA secure_delete=ON")
            if conn.execute("PRAGMA secure_delete").fetchone()[0] != 1:
                raise KeyStoreError("this SQLite build does not honour PRAGMA secure_delete")
            conn.execute("PRAGMA journal_size_limit=0")
            self._conn = conn
            self._open_schema()
        except BaseException:
            self._conn = None
            conn.close()
            raise

    def _open_schema(self) -> None:
        with self.transaction():
            conn = self._db()
            known = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone()
            if known is None:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                conn.execute("INSERT INTO store_meta (name, value) VALUES ('node', ?)", (self._node,))
                return
            versions = [row[0] for row in conn.execute("SELECT version FROM schema_version")]
            if versions != [SCHEMA_VERSION]:
                raise KeyStoreError(f"key store schema version {versions} is not the supported {SCHEMA_VERSION}")
            row = conn.execute("SELECT value FROM store_meta WHERE name = 'node'").fetchone()
            if row is None or row[0] != self._node:
                owner = None if row is None else row[0]
                raise KeyStoreError(f"key store {self._path!r} belongs to node {owner!r}, not {self._node!r}")

    # --- plumbing -------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise KeyStoreError("the key store is closed")
        return self._conn

    @property
    def node(self) -> str:
        return self._node

    @property
    def path(self) -> str:
        return self._path

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"<KeyStore node={self._node!r} path={self._path!r} {state}>"

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent); not allowed inside `transaction()`."""
        with self._lock:
            if self._conn is None:
                return
            if self._depth:
                raise KeyStoreError("close() inside a transaction")
            conn, self._conn = self._conn, None
            conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT around the block (ROLLBACK on an exception).

        Nested calls (and every store method called inside) join the outer transaction
        as a SAVEPOINT: an exception rolls back that inner part only, and nothing is
        durable before the outermost block commits. Holds the object's lock throughout.
        """
        with self._lock:
            conn = self._db()
            if self._depth == 0:
                conn.execute("BEGIN IMMEDIATE")
                self._depth = 1
                try:
                    yield
                except BaseException:
                    self._depth = 0
                    if conn.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                        conn.execute("ROLLBACK")
                    raise
                self._depth = 0
                try:
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            else:
                name = f"kms_sp{self._depth}"
                conn.execute(f"SAVEPOINT {name}")
                self._depth += 1
                try:
                    yield
                except BaseException:
                    self._depth -= 1
                    if conn.in_transaction:
                        conn.execute(f"ROLLBACK TO {name}")
                        conn.execute(f"RELEASE {name}")
                    raise
                self._depth -= 1
                conn.execute(f"RELEASE {name}")

    def checkpoint(self) -> bool:
        """PRAGMA wal_checkpoint(TRUNCATE): copy the WAL into the file and truncate it.

        Removes stale page images (which may hold consumed key bytes) from the -wal file.
        Returns False when another connection kept it from completing. Not inside a
        transaction; a no-op (True) for ":memory:".
        """
        with self._lock:
            conn = self._db()
            if self._depth:
                raise KeyStoreError("checkpoint() inside a transaction")
            busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return busy == 0

    def integrity_check(self) -> str:
        """PRAGMA integrity_check's answer ("ok" when the file is sound)."""
        with self._lock:
            rows = self._db().execute("PRAGMA integrity_check").fetchall()
            return "\n".join(str(r[0]) for r in rows)

    # --- link material (layer 1) ----------------------------------------------------

    def _peer(self, peer: object) -> str:
        name = _name(peer, "peer")
        if name == self._node:
            raise KeyStoreError(f"a link needs two nodes; peer is this node {name!r}")
        return name

    def add_link_block(self, peer: str, block_id: int, key: bytes, now: float) -> None:
        """Append the final key of QKD block `block_id` of the link to `peer` (whole bytes).

        First `len(key) // 2` bytes -> stream of min(node, peer), the rest -> stream of
        max(node, peer). A block id already added for this peer -> KeyStoreError (nothing
        changed). Empty blocks are recorded (they count for `link_digest`).
        """
        peer = self._peer(peer)
        bid = _count(block_id, "block_id", minimum=0)
        data = _secret(key, "key")
        added_s = _time_s(now)
        half = len(data) // 2
        first, second = data[:half], data[half:]
        own_part, peer_part = (first, second) if self._node < peer else (second, first)
        with self.transaction():
            conn = self._db()
            if conn.execute("SELECT 1 FROM link_blocks WHERE peer = ? AND block_id = ?", (peer, bid)).fetchone():
                raise KeyStoreError(f"block {bid} of the link to {peer!r} was added before")
            seq = conn.execute(
                "SELECT coalesce(max(seq) + 1, 0) FROM link_blocks WHERE peer = ?", (peer,)
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO link_blocks (peer, block_id, seq, n_bytes, sha256, added_s) VALUES (?, ?, ?, ?, ?, ?)",
                (peer, bid, seq, len(data), hashlib.sha256(data).digest(), added_s),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO link_streams (peer, own, added_bytes, taken_bytes, skipped_bytes) "
                "VALUES (?, ?, 0, 0, 0)",
                ((peer, 1), (peer, 0)),
            )
            for own, part in ((1, own_part), (0, peer_part)):
                if not part:
                    continue
                end = conn.execute(
                    "SELECT added_bytes FROM link_streams WHERE peer = ? AND own = ?", (peer, own)
                ).fetchone()[0]
                conn.executemany(
                    "INSERT INTO link_chunks (peer, own, start_pos, data) VALUES (?, ?, ?, ?)",
                    (
                        (peer, own, end + offset, part[offset : offset + _CHUNK_BYTES])
                        for offset in range(0, len(part), _CHUNK_BYTES)
                    ),
                )
                conn.execute(
                    "UPDATE link_streams SET added_bytes = added_bytes + ? WHERE peer = ? AND own = ?",
                    (len(part), peer, own),
                )

    def _stream(self, peer: str, own: int) -> tuple[int, int, int]:
        """(added, taken, skipped) of a stream; zeros for a peer with no blocks yet."""
        row = self._db().execute(
            "SELECT added_bytes, taken_bytes, skipped_bytes FROM link_streams WHERE peer = ? AND own = ?",
            (peer, own),
        ).fetchone()
        return (0, 0, 0) if row is None else (row[0], row[1], row[2])

    def _consume(self, peer: str, own: int, pos: int, n_bytes: int) -> bytes:
        """Remove every stored byte before pos + n_bytes; return [pos, pos + n_bytes).

        Precondition: front <= pos and pos + n_bytes <= added. Each touched chunk is
        overwritten with zeros before it is deleted or shortened.
        """
        conn = self._db()
        end = pos + n_bytes
        rows = conn.execute(
            "SELECT id, start_pos, data FROM link_chunks WHERE peer = ? AND own = ? AND start_pos < ? "
            "ORDER BY start_pos",
            (peer, own, end),
        ).fetchall()
        out = bytearray()
        zero, drop, keep = [], [], []
        for row_id, start, data in rows:
            stop = start + len(data)
            lo, hi = max(pos, start), min(end, stop)
            if hi > lo:
                out += data[lo - start : hi - start]
            zero.append((row_id,))
            if stop <= end:
                drop.append((row_id,))
            else:
                keep.append((end, data[end - start :], row_id))
        if len(out) != n_bytes:
            raise KeyStoreError(f"link stream to {peer!r} is inconsistent: {len(out)} of {n_bytes} bytes found")
        conn.executemany("UPDATE link_chunks SET data = zeroblob(length(data)) WHERE id = ?", zero)
        conn.executemany("DELETE FROM link_chunks WHERE id = ?", drop)
        conn.executemany("UPDATE link_chunks SET start_pos = ?, data = ? WHERE id = ?", keep)
        return bytes(out)

    def link_bytes_available(self, peer: str, *, own: bool) -> int:
        """Bytes not yet taken from the stream this node owns (`own`) or the peer's; 0 for an unknown peer."""
        peer = self._peer(peer)
        with self._lock:
            added, taken, skipped = self._stream(peer, 1 if own else 0)
        return added - taken - skipped

    def take_own(self, peer: str, n_bytes: int) -> tuple[int, bytes]:
        """Take `n_bytes` from the front of the stream this node owns: (position, bytes).

        Tell the peer the position; it calls `take_peer(node, pos, n_bytes)`. KeyExhausted
        (nothing changed) when fewer bytes are available.
        """
        peer = self._peer(peer)
        n = _count(n_bytes, "n_bytes", minimum=1)
        with self.transaction():
            added, taken, _skipped = self._stream(peer, 1)
            if added - taken < n:
                raise KeyExhausted(f"own link stream to {peer!r} holds {added - taken} bytes; {n} requested")
            data = self._consume(peer, 1, taken, n)
            self._db().execute(
                "UPDATE link_streams SET taken_bytes = taken_bytes + ? WHERE peer = ? AND own = 1", (n, peer)
            )
        return taken, data

    def take_peer(self, peer: str, pos: int, n_bytes: int) -> bytes:
        """Take the bytes [pos, pos + n_bytes) of `peer`'s stream, as the peer's take_own did.

        pos < front -> AlreadyTaken; bytes not all arrived -> NotYetAvailable (both: nothing
        changed). pos > front: the gap was taken by the peer in a message this node never
        saw; it is skipped and zeroised.
        """
        peer = self._peer(peer)
        start = _count(pos, "pos", minimum=0)
        n = _count(n_bytes, "n_bytes", minimum=1)
        with self.transaction():
            added, taken, skipped = self._stream(peer, 0)
            front = taken + skipped
            if start < front:
                raise AlreadyTaken(f"bytes at {start} of {peer!r}'s link stream were taken (front is {front})")
            if start + n > added:
                raise NotYetAvailable(
                    f"{peer!r}'s link stream has {added} bytes so far; [{start}, {start + n}) requested"
                )
            data = self._consume(peer, 0, start, n)
            self._db().execute(
                "UPDATE link_streams SET taken_bytes = taken_bytes + ?, skipped_bytes = skipped_bytes + ? "
                "WHERE peer = ? AND own = 0",
                (n, start - front, peer),
            )
        return data

    def link_statistics(self, peer: str) -> LinkStatistics:
        """Counts for the link to `peer` (zeros for an unknown peer)."""
        peer = self._peer(peer)
        with self._lock:
            blocks = self._db().execute("SELECT count(*) FROM link_blocks WHERE peer = ?", (peer,)).fetchone()[0]
            own_added, own_taken, _ = self._stream(peer, 1)
            peer_added, peer_taken, peer_skipped = self._stream(peer, 0)
        return LinkStatistics(
            peer=peer,
            blocks=blocks,
            own_added_bytes=own_added,
            own_taken_bytes=own_taken,
            own_available_bytes=own_added - own_taken,
            peer_added_bytes=peer_added,
            peer_taken_bytes=peer_taken,
            peer_skipped_bytes=peer_skipped,
            peer_available_bytes=peer_added - peer_taken - peer_skipped,
        )

    def link_digest(self, peer: str) -> bytes:
        """SHA-256 over the concatenated SHA-256 of every block added for `peer`, in add order.

        Equal at both ends iff they added the same blocks in the same order; survives
        consumption and restarts. SHA-256 of nothing for an unknown peer. Audit/tests only.
        """
        peer = self._peer(peer)
        chain = hashlib.sha256()
        with self._lock:
            for (digest,) in self._db().execute("SELECT sha256 FROM link_blocks WHERE peer = ? ORDER BY seq", (peer,)):
                chain.update(digest)
        return chain.digest()

    def link_peers(self) -> tuple[str, ...]:
        """Peers with at least one block added, sorted."""
        with self._lock:
            rows = self._db().execute("SELECT DISTINCT peer FROM link_blocks ORDER BY peer").fetchall()
        return tuple(r[0] for r in rows)

    # --- KME-pair keys (layer 2) ----------------------------------------------------

    def _row(self, key_id: str) -> tuple | None:
        return self._db().execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_id = ?", (key_id,)).fetchone()

    @staticmethod
    def _stored(row: tuple, **changes: object) -> StoredKey:
        (_id, key_id, peer_kme, owner, origin, size_bits, state, master, slaves, parties, delivered, created_s, blob) = (
            row
        )
        record = StoredKey(
            key_id=key_id,
            peer_kme=peer_kme,
            size_bits=size_bits,
            state=KeyState(state),
            owner=owner,
            origin=origin,
            master_sae=master,
            slave_saes=_load(slaves),
            delivered_to=_load(delivered),
            created_s=created_s,
            key=bytes(blob),
            parties=_load(parties),
        )
        return dataclasses.replace(record, **changes) if changes else record

    def _parties(
        self, owner: str, peer_kme: str, master_sae: str | None, slave_saes: tuple[str, ...], parties: object
    ) -> tuple[str, ...]:
        if parties is not None:
            return _names(parties, "parties")  # type: ignore[arg-type]
        if peer_kme == self._node:  # both ends here: everyone fetches this copy
            return tuple(dict.fromkeys(((master_sae,) if master_sae else ()) + slave_saes))
        if owner == self._node:  # the assigning (master) side
            return (master_sae,) if master_sae else ()
        return slave_saes

    def put_key(
        self,
        key_id: str,
        peer_kme: str,
        key: bytes,
        *,
        owner: str,
        origin: str,
        state: KeyState = KeyState.READY,
        now: float,
    ) -> None:
        """Store a new KME-pair key (PENDING or READY); `key_id` a canonical UUID string.

        `owner` (the KME that may assign it) is this node or `peer_kme`. An id already
        present — tombstones included — is refused with KeyStoreError (nothing changed).
        """
        kid = _new_key_id(key_id)
        peer_kme = _name(peer_kme, "peer_kme")
        owner = _name(owner, "owner")
        if owner not in (self._node, peer_kme):
            raise KeyStoreError(f"owner {owner!r} of key {kid} is neither this node nor peer_kme {peer_kme!r}")
        if origin not in ORIGINS:
            raise KeyStoreError(f"origin must be one of {sorted(ORIGINS)}, got {_show(origin)}")
        data = _secret(key, "key")
        if not data:
            raise KeyStoreError(f"key {kid} is empty")
        state = _state(state)
        if state not in (KeyState.PENDING, KeyState.READY):
            raise KeyStoreError(f"a new key is PENDING or READY, not {state.name}")
        created_s = _time_s(now)
        with self.transaction():
            conn = self._db()
            old = conn.execute("SELECT state FROM keys WHERE key_id = ?", (kid,)).fetchone()
            if old is not None:
                raise KeyStoreError(f"key {kid} exists already (state {old[0]})")
            conn.execute(
                "INSERT INTO keys (key_id, peer_kme, owner, origin, size_bits, state, master_sae, slave_saes, "
                "parties, delivered_to, created_s, key) VALUES (?, ?, ?, ?, ?, ?, NULL, '[]', '[]', '[]', ?, ?)",
                (kid, peer_kme, owner, origin, 8 * len(data), state.value, created_s, data),
            )

    def set_state(
        self,
        key_id: str,
        state: KeyState,
        *,
        master_sae: str | None = None,
        slave_saes: Sequence[str] = (),
        parties: Sequence[str] | None = None,
    ) -> None:
        """Move a key along the life-cycle table (module docstring).

        ASSIGNED records master_sae, slave_saes and the parties (explicit, or the default
        described in the module docstring); the parties must not be empty, and an ASSIGNED
        key is re-assigned only while no party has been served. DELIVERED and WITHDRAWN
        are reached through deliver() and drop_key(). Tombstone -> KeyConsumed.
        """
        kid = _lookup_key_id(key_id)
        state = _state(state)
        master = None if master_sae is None else _name(master_sae, "master_sae")
        slaves = _names(slave_saes, "slave_saes")
        if state in _TOMBSTONES:
            raise KeyStoreError(f"set_state cannot make key {kid} {state.name}; use deliver() or drop_key()")
        if state is not KeyState.ASSIGNED and (master is not None or slaves or parties is not None):
            raise KeyStoreError(f"SAEs are recorded only with ASSIGNED, not {state.name} (key {kid})")
        with self.transaction():
            conn = self._db()
            row = self._row(kid)
            if row is None:
                raise KeyNotFound(f"no key with id {kid}")
            current = KeyState(row[6])
            if current in _TOMBSTONES:
                raise KeyConsumed(f"key {kid} is {current.value}")
            if state not in _TRANSITIONS[current]:
                raise KeyStoreError(f"key {kid} cannot go from {current.name} to {state.name}")
            if state is not KeyState.ASSIGNED:
                conn.execute("UPDATE keys SET state = ? WHERE id = ?", (state.value, row[0]))
                return
            if _load(row[10]):
                raise KeyStoreError(f"key {kid} was delivered to a party already; its parties are fixed")
            who = self._parties(row[3], row[2], master, slaves, parties)
            if not who:
                raise KeyStoreError(f"key {kid}: ASSIGNED needs at least one party (master_sae, slave_saes or parties)")
            conn.execute(
                "UPDATE keys SET state = ?, master_sae = ?, slave_saes = ?, parties = ? WHERE id = ?",
                (state.value, master, _dump(slaves), _dump(who), row[0]),
            )

    def list_keys(
        self, state: KeyState, *, owner: str | None = None, peer_kme: str | None = None
    ) -> list[StoredKey]:
        """Keys in `state` (optionally of one owner / peer KME), oldest first, bytes
        included (for crash recovery). Tombstone states hold no bytes: they list nothing."""
        st = _state(state)
        sql = f"SELECT {_KEY_COLUMNS} FROM keys WHERE state = ? AND key IS NOT NULL"
        args: list[object] = [st.value]
        if owner is not None:
            sql += " AND owner = ?"
            args.append(_name(owner, "owner"))
        if peer_kme is not None:
            sql += " AND peer_kme = ?"
            args.append(_name(peer_kme, "peer_kme"))
        with self._lock:
            rows = self._db().execute(sql + " ORDER BY id", args).fetchall()
        return [self._stored(row) for row in rows]

    def get_key(self, key_id: str) -> StoredKey:
        """The key with this id (bytes included); KeyNotFound, or KeyConsumed for a tombstone."""
        kid = _lookup_key_id(key_id)
        with self._lock:
            row = self._row(kid)
        if row is None:
            raise KeyNotFound(f"no key with id {kid}")
        if row[12] is None:
            raise KeyConsumed(f"key {kid} is {row[6]}")
        return self._stored(row)

    def take_ready(
        self,
        peer_kme: str,
        owner: str,
        n: int,
        size_bits: int,
        *,
        master_sae: str | None = None,
        slave_saes: Sequence[str] = (),
        parties: Sequence[str] | None = None,
    ) -> list[StoredKey]:
        """Atomically move the `n` oldest READY keys of (peer_kme, owner, size_bits) to ASSIGNED.

        With SAEs (or `parties`) given they are recorded as set_state(ASSIGNED, ...) would,
        in the same transaction; without, the keys get no parties yet. KeyExhausted
        (nothing changed) if fewer than `n` are READY. Oldest = smallest created_s, then
        insertion order.
        """
        peer_kme = _name(peer_kme, "peer_kme")
        owner = _name(owner, "owner")
        count = _count(n, "n", minimum=0)
        bits = _count(size_bits, "size_bits", minimum=8)
        if bits % 8:
            raise KeyStoreError(f"size_bits must be a multiple of 8, got {bits}")
        master = None if master_sae is None else _name(master_sae, "master_sae")
        slaves = _names(slave_saes, "slave_saes")
        naming = master is not None or bool(slaves) or parties is not None
        who = self._parties(owner, peer_kme, master, slaves, parties) if naming else ()
        if naming and not who:
            raise KeyStoreError("take_ready: the SAEs given name no party for this node's copy")
        if count == 0:
            return []
        with self.transaction():
            conn = self._db()
            rows = conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM keys WHERE peer_kme = ? AND owner = ? AND state = 'ready' "
                "AND size_bits = ? ORDER BY created_s, id LIMIT ?",
                (peer_kme, owner, bits, count),
            ).fetchall()
            if len(rows) < count:
                raise KeyExhausted(
                    f"{len(rows)} READY keys of {bits} bits for peer {peer_kme!r}, owner {owner!r}; {count} requested"
                )
            conn.executemany(
                "UPDATE keys SET state = 'assigned', master_sae = ?, slave_saes = ?, parties = ? WHERE id = ?",
                ((master, _dump(slaves), _dump(who), row[0]) for row in rows),
            )
        return [
            self._stored(row, state=KeyState.ASSIGNED, master_sae=master, slave_saes=slaves, parties=who)
            for row in rows
        ]

    def deliver(self, key_id: str, sae: str) -> StoredKey:
        """Record that `sae` gets the key, and return it (bytes included).

        Checked in this order: unknown -> KeyNotFound; not ASSIGNED or no parties named ->
        KeyNotAssigned; `sae` not a party -> NotAParty; `sae` served before or the key a
        tombstone -> KeyConsumed. When every party has been served the key bytes are
        overwritten with zeros, then NULLed, and the state becomes DELIVERED — all
        committed before the bytes are returned (module docstring, "Crash safety").
        """
        kid = _lookup_key_id(key_id)
        sae = _name(sae, "sae")
        with self.transaction():
            conn = self._db()
            row = self._row(kid)
            if row is None:
                raise KeyNotFound(f"no key with id {kid}")
            state = KeyState(row[6])
            parties = _load(row[9])
            delivered = _load(row[10])
            if state in (KeyState.PENDING, KeyState.READY) or (state is KeyState.ASSIGNED and not parties):
                raise KeyNotAssigned(f"key {kid} is {state.value} and assigned to no SAE")
            if parties and sae not in parties:
                raise NotAParty(f"key {kid} was not assigned to SAE {sae!r}")
            if state in _TOMBSTONES or sae in delivered:
                raise KeyConsumed(f"key {kid} was delivered to SAE {sae!r} before or is {state.value}")
            delivered = (*delivered, sae)
            if all(p in delivered for p in parties):
                conn.execute("UPDATE keys SET key = zeroblob(length(key)) WHERE id = ?", (row[0],))
                conn.execute(
                    "UPDATE keys SET key = NULL, state = 'delivered', delivered_to = ? WHERE id = ?",
                    (_dump(delivered), row[0]),
                )
                state = KeyState.DELIVERED
            else:
                conn.execute("UPDATE keys SET delivered_to = ? WHERE id = ?", (_dump(delivered), row[0]))
        return self._stored(row, state=state, delivered_to=delivered)

    def drop_key(self, key_id: str) -> None:
        """Zeroise a key and leave a WITHDRAWN tombstone; idempotent on tombstones; KeyNotFound if unknown."""
        kid = _lookup_key_id(key_id)
        with self.transaction():
            conn = self._db()
            row = self._row(kid)
            if row is None:
                raise KeyNotFound(f"no key with id {kid}")
            if row[12] is None:
                return
            conn.execute("UPDATE keys SET key = zeroblob(length(key)) WHERE id = ?", (row[0],))
            conn.execute("UPDATE keys SET key = NULL, state = 'withdrawn' WHERE id = ?", (row[0],))

    def count_keys(
        self, peer_kme: str, owner: str, state: KeyState = KeyState.READY, size_bits: int | None = None
    ) -> int:
        """Number of keys of (peer_kme, owner) in `state`, of `size_bits` if given."""
        peer_kme = _name(peer_kme, "peer_kme")
        owner = _name(owner, "owner")
        state = _state(state)
        sql = "SELECT count(*) FROM keys WHERE peer_kme = ? AND owner = ? AND state = ?"
        args: tuple[object, ...] = (peer_kme, owner, state.value)
        if size_bits is not None:
            sql += " AND size_bits = ?"
            args += (_count(size_bits, "size_bits", minimum=0),)
        with self._lock:
            return int(self._db().execute(sql, args).fetchone()[0])

    def key_statistics(self) -> dict[str, dict[str, int]]:
        """{peer_kme: {state value: count}} with every state present (zeros included)."""
        with self._lock:
            rows = self._db().execute("SELECT peer_kme, state, count(*) FROM keys GROUP BY peer_kme, state").fetchall()
        stats: dict[str, dict[str, int]] = {}
        for peer_kme, state, count in rows:
            stats.setdefault(peer_kme, {s.value: 0 for s in KeyState})[state] = int(count)
        return stats
