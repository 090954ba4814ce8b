"""nodes.kms.store: link streams, key life cycle, exactly-once under threads and kill -9, zeroisation."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodes.kms.store import (
    AlreadyTaken,
    KeyConsumed,
    KeyExhausted,
    KeyNotAssigned,
    KeyNotFound,
    KeyState,
    KeyStore,
    KeyStoreError,
    LinkStatistics,
    NotAParty,
    NotYetAvailable,
    StoredKey,
)

from ._kms_store_child import BLOCK_BYTES, TAKE_BYTES, block_bytes

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("_kms_store_child.py")


def kid() -> str:
    return str(uuid.uuid4())


def leaks(text: str, secret: bytes) -> bool:
    """Does `text` show `secret` in any usual spelling (raw repr, hex, base64)?"""
    spellings = [repr(secret), secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode()]
    spellings += [secret.decode("latin-1")]
    return any(s in text for s in spellings)


@pytest.fixture
def store() -> Iterator[KeyStore]:
    with KeyStore(":memory:", "alice") as s:
        yield s


# --- opening, schema, pragmas ---------------------------------------------------------


def test_file_store_uses_wal_full_sync_secure_delete_and_a_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "kms.sqlite"
    with KeyStore(path, "alice") as s:
        conn = s._db()  # synchronous and secure_delete are per connection: ask the store's own
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
        assert s.integrity_check() == "ok"
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    finally:
        raw.close()


def test_reopen_refuses_another_node_and_another_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "kms.sqlite"
    KeyStore(path, "alice").close()
    with pytest.raises(KeyStoreError, match="belongs to node 'alice'"):
        KeyStore(path, "bob")
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("UPDATE schema_version SET version = 99")
    raw.close()
    with pytest.raises(KeyStoreError, match="schema version"):
        KeyStore(path, "alice")


def test_closed_store_refuses_calls_and_close_is_idempotent() -> None:
    s = KeyStore(":memory:", "alice")
    s.close()
    s.close()
    with pytest.raises(KeyStoreError, match="closed"):
        s.count_keys("bob", "alice")
    assert "closed" in repr(s)


def test_keys_and_link_streams_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "kms.sqlite"
    rng = random.Random(7)
    blocks = [rng.randbytes(101), rng.randbytes(64)]
    key_id, key = kid(), rng.randbytes(32)
    with KeyStore(path, "alice") as s:
        for i, block in enumerate(blocks):
            s.add_link_block("bob", i, block, 1.0)
        first = s.take_own("bob", 20)
        s.put_key(key_id, "bob", key, owner="alice", origin="link", now=2.0)
        digest, stats = s.link_digest("bob"), s.link_statistics("bob")
    with KeyStore(path, "alice") as s:
        assert s.link_statistics("bob") == stats
        assert s.link_digest("bob") == digest
        own = blocks[0][:50] + blocks[1][:32]  # alice < bob: alice owns the first halves
        assert first == (0, own[:20])
        assert s.take_own("bob", 30) == (20, own[20:50])
        assert s.get_key(key_id).key == key
        assert s.link_peers() == ("bob",)


# --- link material ------------------------------------------------------------------


def test_blocks_split_first_half_to_the_lower_name() -> None:
    block = bytes(range(7))  # odd length: 7 // 2 = 3 bytes to the lower name
    with KeyStore(":memory:", "alice") as alice, KeyStore(":memory:", "bob") as bob:
        alice.add_link_block("bob", 5, block, 0.0)
        bob.add_link_block("alice", 5, block, 0.0)
        assert alice.link_bytes_available("bob", own=True) == 3
        assert alice.link_bytes_available("bob", own=False) == 4
        assert bob.link_bytes_available("alice", own=True) == 4
        assert alice.take_own("bob", 3) == (0, block[:3])
        assert bob.take_peer("alice", 0, 3) == block[:3]
        assert bob.take_own("alice", 4) == (0, block[3:])
        assert alice.take_peer("bob", 0, 4) == block[3:]
        assert alice.link_digest("bob") == bob.link_digest("alice")
        expected = hashlib.sha256(hashlib.sha256(block).digest()).digest()
        assert alice.link_digest("bob") == expected


def test_take_peer_skips_and_zeroises_a_gap_and_rejects_replays(store: KeyStore) -> None:
    block = bytes(range(1, 41))  # 20 bytes per stream; "bob" > "alice": bob owns block[20:]
    store.add_link_block("bob", 0, block, 0.0)
    peer_stream = block[20:]
    assert store.take_peer("bob", 8, 4) == peer_stream[8:12]
    stats = store.link_statistics("bob")
    assert (stats.peer_taken_bytes, stats.peer_skipped_bytes, stats.peer_front_bytes) == (4, 8, 12)
    assert stats.peer_available_bytes == 8
    for pos in (0, 4, 11):
        with pytest.raises(AlreadyTaken):
            store.take_peer("bob", pos, 2)
    with pytest.raises(NotYetAvailable):
        store.take_peer("bob", 12, 9)  # only 8 bytes have arrived past the front
    with pytest.raises(NotYetAvailable):
        store.take_peer("bob", 30, 1)
    assert store.link_statistics("bob") == stats  # failed calls change nothing
    assert store.take_peer("bob", 12, 8) == peer_stream[12:]
    with pytest.raises(KeyExhausted):
        store.take_own("bob", 21)
    assert store.link_statistics("bob").own_available_bytes == 20


def test_link_argument_checks(store: KeyStore) -> None:
    store.add_link_block("bob", 1, b"\x01" * 10, 0.0)
    with pytest.raises(KeyStoreError, match="block 1 .* added before"):
        store.add_link_block("bob", 1, b"\x02" * 10, 1.0)
    with pytest.raises(KeyStoreError, match="peer is this node"):
        store.add_link_block("alice", 2, b"\x01", 0.0)
    with pytest.raises(KeyStoreError):
        store.add_link_block("bob", -1, b"\x01", 0.0)
    with pytest.raises(KeyStoreError):
        store.add_link_block("bob", 3, "not bytes", 0.0)  # type: ignore[arg-type]
    with pytest.raises(KeyStoreError):
        store.take_own("bob", 0)
    assert store.link_bytes_available("carol", own=True) == 0
    with pytest.raises(KeyExhausted):
        store.take_own("carol", 1)
    with pytest.raises(NotYetAvailable):
        store.take_peer("carol", 0, 1)
    assert store.link_statistics("carol") == LinkStatistics("carol", 0, 0, 0, 0, 0, 0, 0, 0)
    assert store.link_digest("carol") == hashlib.sha256(b"").digest()
    store.add_link_block("bob", 2, b"", 0.0)  # an empty block counts for the digest only
    assert store.link_statistics("bob").blocks == 2
    assert store.link_statistics("bob").own_added_bytes == 5


class _Side:
    """One end of the simulated link: its store, the blocks it has added, what it follows."""

    def __init__(self, name: str, peer: str) -> None:
        self.name, self.peer = name, peer
        self.store = KeyStore(":memory:", name)
        self.blocks_added = 0
        self.follow_front = 0  # front of the peer's stream, as this side should have it
        self.inbox: list[tuple[int, int, bytes]] = []  # (pos, n, bytes the owner got)


def _stream(blocks: list[bytes], owner: str, other: str) -> bytes:
    """Reference model: the owner's stream is its half of every block, in order."""
    lower = owner < other
    return b"".join(b[: len(b) // 2] if lower else b[len(b) // 2 :] for b in blocks)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_interleavings_both_ends_take_identical_bytes(seed: int) -> None:
    rng = random.Random(seed)
    block_ids = rng.sample(range(10**6), 150)  # ids need not be contiguous
    blocks = [rng.randbytes(rng.choice([0, 1, 2, 31, 64, 257, 1500, 2500])) for _ in block_ids]
    a, b = _Side("alice", "bob"), _Side("bob", "alice")
    sides = {"alice": a, "bob": b}
    own_taken = {"alice": 0, "bob": 0}
    matched = skipped_msgs = not_yet = 0

    def expect_available(side: _Side) -> int:
        return len(_stream(blocks[: side.blocks_added], side.name, side.peer)) - own_taken[side.name]

    def deliver_message(to: _Side, index: int, keep: bool) -> None:
        nonlocal matched, skipped_msgs, not_yet
        pos, n, sent = to.inbox[index]
        arrived = len(_stream(blocks[: to.blocks_added], to.peer, to.name))
        if pos < to.follow_front:
            with pytest.raises(AlreadyTaken):
                to.store.take_peer(to.peer, pos, n)
            skipped_msgs += 1
        elif pos + n > arrived:
            with pytest.raises(NotYetAvailable):
                to.store.take_peer(to.peer, pos, n)
            not_yet += 1
            return  # stays in the inbox until the block arrives
        else:
            got = to.store.take_peer(to.peer, pos, n)
            assert got == sent
            to.follow_front = pos + n
            matched += 1
        if not keep:
            to.inbox.pop(index)

    for _ in range(1000):
        side = sides[rng.choice(["alice", "bob"])]
        other = sides[side.peer]
        op = rng.random()
        if op < 0.15 and side.blocks_added < len(blocks):
            side.store.add_link_block(side.peer, block_ids[side.blocks_added], blocks[side.blocks_added], 0.0)
            side.blocks_added += 1
        elif op < 0.55:
            n = rng.randint(1, 400)
            before = side.store.link_statistics(side.peer)
            if n > expect_available(side):
                with pytest.raises(KeyExhausted):
                    side.store.take_own(side.peer, n)
                assert side.store.link_statistics(side.peer) == before
                continue
            pos, data = side.store.take_own(side.peer, n)
            model = _stream(blocks[: side.blocks_added], side.name, side.peer)
            assert (pos, data) == (own_taken[side.name], model[pos : pos + n])
            own_taken[side.name] += n
            if rng.random() < 0.1:
                continue  # message lost: the follower will skip these bytes
            other.inbox.append((pos, n, data))
        elif side.inbox:
            # out of order (any of the first three), sometimes duplicated
            deliver_message(side, rng.randrange(min(3, len(side.inbox))), keep=rng.random() < 0.1)
        stats = side.store.link_statistics(side.peer)
        assert stats.own_taken_bytes == own_taken[side.name]
        assert stats.peer_front_bytes == side.follow_front

    for side in (a, b):  # all blocks arrive, every message is delivered in order
        while side.blocks_added < len(blocks):
            side.store.add_link_block(side.peer, block_ids[side.blocks_added], blocks[side.blocks_added], 0.0)
            side.blocks_added += 1
    for side in (a, b):
        side.inbox.sort()
        while side.inbox:
            deliver_message(side, 0, keep=False)
        stats = side.store.link_statistics(side.peer)
        peer_stream = _stream(blocks, side.peer, side.name)
        assert stats.peer_added_bytes == len(peer_stream)
        assert stats.peer_available_bytes == len(peer_stream) - side.follow_front
    assert a.store.link_digest("bob") == b.store.link_digest("alice")
    assert matched > 100 and skipped_msgs > 5 and not_yet > 5  # every path was exercised
    for side in (a, b):
        side.store.close()


# --- key life cycle -----------------------------------------------------------------


def test_key_ids_must_be_canonical_uuid_strings(store: KeyStore) -> None:
    good = kid()
    for bad in ("not-a-uuid", good.upper(), "{" + good + "}", good.replace("-", ""), 42):
        with pytest.raises(KeyStoreError, match="canonical UUID"):
            store.put_key(bad, "bob", b"k" * 32, owner="alice", origin="link", now=0.0)  # type: ignore[arg-type]
    store.put_key(good, "bob", b"k" * 32, owner="alice", origin="link", now=0.0)
    assert store.get_key(good.upper()).key_id == good  # lookups normalise
    with pytest.raises(KeyNotFound):
        store.get_key("garbage")
    with pytest.raises(KeyNotFound):
        store.get_key(kid())


def test_put_key_argument_checks(store: KeyStore) -> None:
    with pytest.raises(KeyStoreError, match="owner"):
        store.put_key(kid(), "bob", b"k" * 32, owner="carol", origin="link", now=0.0)
    with pytest.raises(KeyStoreError, match="origin"):
        store.put_key(kid(), "bob", b"k" * 32, owner="alice", origin="magic", now=0.0)
    with pytest.raises(KeyStoreError, match="empty"):
        store.put_key(kid(), "bob", b"", owner="alice", origin="link", now=0.0)
    with pytest.raises(KeyStoreError, match="PENDING or READY"):
        store.put_key(kid(), "bob", b"k", owner="alice", origin="link", state=KeyState.ASSIGNED, now=0.0)
    key_id = kid()
    store.put_key(key_id, "bob", b"k" * 32, owner="bob", origin="relay", now=0.0)
    with pytest.raises(KeyStoreError, match="exists already"):
        store.put_key(key_id, "bob", b"x" * 32, owner="bob", origin="relay", now=0.0)
    assert store.get_key(key_id).key == b"k" * 32
    assert store.get_key(key_id).size_bits == 256


def test_take_ready_oldest_first_by_peer_owner_size_and_all_or_nothing(store: KeyStore) -> None:
    ids = {}
    for created_s in (5.0, 1.0, 3.0):
        ids[created_s] = kid()
        store.put_key(ids[created_s], "bob", os.urandom(32), owner="alice", origin="link", now=created_s)
    store.put_key(kid(), "bob", os.urandom(16), owner="alice", origin="link", now=0.0)  # other size
    store.put_key(kid(), "bob", os.urandom(32), owner="bob", origin="link", now=0.0)  # other owner
    store.put_key(kid(), "carol", os.urandom(32), owner="alice", origin="link", now=0.0)  # other peer
    store.put_key(kid(), "bob", os.urandom(32), owner="alice", origin="link", state=KeyState.PENDING, now=0.0)
    with pytest.raises(KeyExhausted, match="3 READY keys"):
        store.take_ready("bob", "alice", 4, 256)
    assert store.count_keys("bob", "alice", KeyState.READY, 256) == 3
    taken = store.take_ready("bob", "alice", 2, 256)
    assert [k.key_id for k in taken] == [ids[1.0], ids[3.0]]
    assert all(k.state is KeyState.ASSIGNED and k.parties == () for k in taken)
    assert store.get_key(ids[1.0]).state is KeyState.ASSIGNED
    assert store.count_keys("bob", "alice") == 2  # READY, any size
    assert store.count_keys("bob", "alice", KeyState.ASSIGNED) == 2
    assert store.take_ready("bob", "alice", 0, 256) == []
    with pytest.raises(KeyStoreError, match="multiple of 8"):
        store.take_ready("bob", "alice", 1, 12)


def test_deliver_records_parties_and_leaves_a_tombstone(store: KeyStore) -> None:
    key_id, key = kid(), os.urandom(32)
    store.put_key(key_id, "bob", key, owner="alice", origin="link", now=0.0)
    with pytest.raises(KeyNotAssigned):
        store.deliver(key_id, "alice-app")
    [assigned] = store.take_ready("bob", "alice", 1, 256)
    with pytest.raises(KeyNotAssigned):  # assigned, but to nobody yet
        store.deliver(key_id, "alice-app")
    store.set_state(key_id, KeyState.ASSIGNED, master_sae="alice-app", slave_saes=("bob-app",))
    stored = store.get_key(key_id)
    assert (stored.parties, stored.master_sae, stored.slave_saes) == (("alice-app",), "alice-app", ("bob-app",))
    with pytest.raises(NotAParty):
        store.deliver(key_id, "bob-app")  # the slave fetches bob's copy, not this one
    got = store.deliver(key_id, "alice-app")
    assert got.key == key and got.state is KeyState.DELIVERED and got.delivered_to == ("alice-app",)
    with pytest.raises(KeyConsumed):
        store.get_key(key_id)
    with pytest.raises(KeyConsumed):
        store.deliver(key_id, "alice-app")
    with pytest.raises(NotAParty):
        store.deliver(key_id, "mallory-app")
    with pytest.raises(KeyStoreError, match="exists already"):  # a consumed id is never resurrected
        store.put_key(key_id, "bob", key, owner="alice", origin="link", now=1.0)
    with pytest.raises(KeyConsumed):
        store.set_state(key_id, KeyState.READY)
    assert store.key_statistics() == {"bob": {"pending": 0, "ready": 0, "assigned": 0, "delivered": 1, "withdrawn": 0}}
    assert assigned.key == key


def test_multicast_every_party_once_then_zeroised(store: KeyStore) -> None:
    key_id, key = kid(), os.urandom(32)
    # bob's key, copy held at alice: the slaves fetch it here (default parties = slave SAEs)
    store.put_key(key_id, "bob", key, owner="bob", origin="link", now=0.0)
    store.set_state(key_id, KeyState.ASSIGNED, master_sae="bob-app", slave_saes=("a1", "a2"))
    first = store.deliver(key_id, "a1")
    assert first.key == key and first.state is KeyState.ASSIGNED and first.delivered_to == ("a1",)
    with pytest.raises(KeyConsumed):
        store.deliver(key_id, "a1")
    with pytest.raises(NotAParty):
        store.deliver(key_id, "bob-app")
    with pytest.raises(KeyStoreError, match="parties are fixed"):
        store.set_state(key_id, KeyState.ASSIGNED, slave_saes=("a3",))
    assert store.get_key(key_id).key == key  # still held for a2
    last = store.deliver(key_id, "a2")
    assert last.key == key and last.state is KeyState.DELIVERED and last.delivered_to == ("a1", "a2")
    with pytest.raises(KeyConsumed):
        store.get_key(key_id)


def test_default_and_explicit_parties(store: KeyStore) -> None:
    local, explicit = kid(), kid()
    store.put_key(local, "alice", b"k" * 32, owner="alice", origin="local", now=0.0)  # both SAEs on alice
    store.set_state(local, KeyState.ASSIGNED, master_sae="a1", slave_saes=("a2",))
    assert store.get_key(local).parties == ("a1", "a2")
    store.put_key(explicit, "bob", b"k" * 32, owner="alice", origin="link", now=0.0)
    [k] = store.take_ready("bob", "alice", 1, 256, master_sae="a1", slave_saes=("b1", "a2"), parties=("a1", "a2"))
    assert k.parties == ("a1", "a2") and store.get_key(explicit).parties == ("a1", "a2")
    other = kid()
    store.put_key(other, "bob", b"k" * 32, owner="bob", origin="link", now=0.0)
    with pytest.raises(KeyStoreError, match="at least one party"):
        store.set_state(other, KeyState.ASSIGNED, master_sae="b-app")  # at the slave end, no slaves named


def test_state_table(store: KeyStore) -> None:
    key_id = kid()
    store.put_key(key_id, "bob", b"k" * 32, owner="alice", origin="relay", state=KeyState.PENDING, now=0.0)
    with pytest.raises(KeyExhausted):
        store.take_ready("bob", "alice", 1, 256)  # PENDING is not READY
    store.set_state(key_id, KeyState.READY)
    with pytest.raises(KeyStoreError, match="from READY to PENDING"):
        store.set_state(key_id, KeyState.PENDING)
    for final in (KeyState.DELIVERED, KeyState.WITHDRAWN):
        with pytest.raises(KeyStoreError, match="deliver"):
            store.set_state(key_id, final)
    with pytest.raises(KeyStoreError, match="only with ASSIGNED"):
        store.set_state(key_id, KeyState.READY, master_sae="a1")
    store.set_state(key_id, KeyState.ASSIGNED, master_sae="a1")
    with pytest.raises(KeyStoreError, match="from ASSIGNED to READY"):
        store.set_state(key_id, KeyState.READY)
    with pytest.raises(KeyNotFound):
        store.set_state(kid(), KeyState.READY)


def test_drop_key_leaves_a_withdrawn_tombstone(store: KeyStore) -> None:
    key_id = kid()
    store.put_key(key_id, "bob", b"k" * 32, owner="alice", origin="pqc", now=0.0)
    store.drop_key(key_id)
    store.drop_key(key_id)  # idempotent
    with pytest.raises(KeyConsumed):
        store.get_key(key_id)
    with pytest.raises(KeyConsumed):
        store.deliver(key_id, "a1")
    with pytest.raises(KeyNotFound):
        store.drop_key(kid())
    assert store.count_keys("bob", "alice", KeyState.WITHDRAWN) == 1
    assert store.key_statistics()["bob"]["withdrawn"] == 1


def test_transactions_are_all_or_nothing_and_nested_failures_roll_back_only_themselves(store: KeyStore) -> None:
    a, b = kid(), kid()
    with pytest.raises(RuntimeError), store.transaction():
        store.put_key(a, "bob", b"k" * 32, owner="alice", origin="link", now=0.0)
        raise RuntimeError("abort")
    with pytest.raises(KeyNotFound):
        store.get_key(a)
    with store.transaction():
        store.put_key(a, "bob", b"k" * 32, owner="alice", origin="link", now=0.0)
        with pytest.raises(KeyExhausted):
            store.take_ready("bob", "alice", 2, 256)
        with pytest.raises(ValueError), store.transaction():
            store.put_key(b, "bob", b"k" * 32, owner="alice", origin="link", now=0.0)
            raise ValueError("inner abort")
    assert store.get_key(a).state is KeyState.READY
    with pytest.raises(KeyNotFound):
        store.get_key(b)
    with store.transaction(), pytest.raises(KeyStoreError, match="inside a transaction"):
        store.checkpoint()


# --- secrets stay secret --------------------------------------------------------------


def test_reprs_statistics_and_errors_never_show_key_bytes(store: KeyStore) -> None:
    key = os.urandom(32)
    block = os.urandom(64)
    key_id = kid()
    store.put_key(key_id, "bob", key, owner="alice", origin="link", now=0.0)
    store.add_link_block("bob", 0, block, 0.0)
    [k] = store.take_ready("bob", "alice", 1, 256, master_sae="a1")
    direct = StoredKey(key_id, "bob", 256, KeyState.READY, "alice", "link", None, (), (), 0.0, key)  # spec order
    assert direct.key == key and direct.parties == ()
    texts = [repr(k), str(k), repr(direct), repr(store.get_key(key_id)), repr(store), str(store)]
    texts += [repr(store.link_statistics("bob")), str(store.key_statistics())]
    errors: list[BaseException] = []
    for call in (
        lambda: store.deliver(key_id, "mallory"),
        lambda: store.put_key(key_id, "bob", key, owner="alice", origin="link", now=0.0),
        lambda: store.take_own("bob", 999),
        lambda: store.take_peer("bob", 0, 999),
        lambda: store.add_link_block("bob", 0, block, 0.0),
    ):
        with pytest.raises(KeyStoreError) as info:
            call()
        errors.append(info.value)
    store.deliver(key_id, "a1")
    with pytest.raises(KeyConsumed) as info:
        store.deliver(key_id, "a1")
    errors.append(info.value)
    texts += [str(e) for e in errors] + [repr(e) for e in errors]
    assert "key=" not in repr(k)
    for text in texts:
        assert not leaks(text, key)
        for i in range(0, 64, 8):
            assert not leaks(text, block[i : i + 8])


def _raw_files(path: Path) -> bytes:
    wal = Path(str(path) + "-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def test_consumed_material_is_gone_from_the_database_and_wal_files(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    path = tmp_path / "kms.sqlite"
    s = KeyStore(path, "alice")
    keys = {kid(): rng.randbytes(32) for _ in range(160)}
    for i, (key_id, key) in enumerate(keys.items()):
        s.put_key(key_id, "bob", key, owner="alice", origin="link", now=float(i))
    ids = list(keys)
    delivered = ids[:90]
    for key_id in delivered:
        [k] = s.take_ready("bob", "alice", 1, 256, master_sae="a1")
        assert k.key_id == key_id
        s.deliver(key_id, "a1")
    dropped = ids[90:120]  # READY ones and half-delivered multicast ones
    for key_id in dropped[::2]:
        s.set_state(key_id, KeyState.ASSIGNED, master_sae="a1", parties=("a1", "a2"))
        s.deliver(key_id, "a1")
    for key_id in dropped:
        s.drop_key(key_id)
    kept = ids[120:]
    blocks = [rng.randbytes(3000) for _ in range(6)]
    for i, block in enumerate(blocks):
        s.add_link_block("bob", i, block, float(i))
    own = _stream(blocks, "alice", "bob")
    peer = _stream(blocks, "bob", "alice")
    while s.link_bytes_available("bob", own=True) > 700:
        s.take_own("bob", rng.randint(1, 300))
    own_front = s.link_statistics("bob").own_front_bytes
    assert s.take_peer("bob", 2000, 1000) == peer[2000:3000]  # [0, 2000) skipped
    assert s.take_peer("bob", 3500, 4000) == peer[3500:7500]
    assert s.checkpoint()
    raw = _raw_files(path)
    # control: the search finds material that is still held
    assert [key_id for key_id in kept if keys[key_id] not in raw] == []
    assert [key_id for key_id in delivered + dropped if keys[key_id] in raw] == []
    windows = 16  # random 16-byte windows cannot occur by chance (2^-128)
    for stream, gone, held in (
        (own, [(0, own_front)], [(own_front, len(own))]),
        (peer, [(0, 7500)], [(7500, len(peer))]),
    ):
        for lo, hi in gone:
            remaining = [i for i in range(lo, hi - windows + 1, windows) if stream[i : i + windows] in raw]
            assert remaining == [], "consumed link bytes remain at these stream offsets"
        for lo, hi in held:
            assert [i for i in range(lo, hi - windows + 1, windows) if stream[i : i + windows] not in raw] == []
    assert s.integrity_check() == "ok"
    s.close()


# --- exactly once under concurrency ---------------------------------------------------


def _fill(path: Path | str, n: int) -> set[str]:
    ids = set()
    with KeyStore(path, "alice") as s, s.transaction():
        for i in range(n):
            key_id = kid()
            s.put_key(key_id, "bob", os.urandom(32), owner="alice", origin="link", now=float(i))
            ids.add(key_id)
    return ids


def _run_threads(target, n_threads: int) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def run(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("shared", [False, True], ids=["store-per-thread", "one-shared-store"])
def test_eight_threads_take_and_deliver_each_key_exactly_once(tmp_path: Path, shared: bool) -> None:
    path = tmp_path / "kms.sqlite"
    ids = _fill(path, 240)
    got: list[list[str]] = [[] for _ in range(8)]
    common = KeyStore(path, "alice") if shared else None

    def worker(i: int) -> None:
        s = common or KeyStore(path, "alice")
        try:
            while True:
                try:
                    [k] = s.take_ready("bob", "alice", 1, 256, master_sae="a1")
                except KeyExhausted:
                    return
                got[i].append(s.deliver(k.key_id, "a1").key_id)
        finally:
            if common is None:
                s.close()

    _run_threads(worker, 8)
    union = [key_id for per_thread in got for key_id in per_thread]
    assert len(union) == len(set(union)) == len(ids)
    assert set(union) == ids
    assert sum(1 for per_thread in got if per_thread) > 1  # the threads really competed
    with KeyStore(path, "alice") as s:
        assert s.key_statistics()["bob"]["delivered"] == len(ids)
    if common is not None:
        common.close()


def test_concurrent_deliver_of_the_same_keys_succeeds_once_per_key(tmp_path: Path) -> None:
    path = tmp_path / "kms.sqlite"
    ids = sorted(_fill(path, 120))
    with KeyStore(path, "alice") as s:
        s.take_ready("bob", "alice", len(ids), 256, master_sae="a1")
    wins: list[list[str]] = [[] for _ in range(8)]
    consumed = [0] * 8

    def worker(i: int) -> None:
        order = ids[:]
        random.Random(i).shuffle(order)
        with KeyStore(path, "alice") as s:
            for key_id in order:
                try:
                    wins[i].append(s.deliver(key_id, "a1").key_id)
                except KeyConsumed:
                    consumed[i] += 1

    _run_threads(worker, 8)
    union = [key_id for per_thread in wins for key_id in per_thread]
    assert sorted(union) == ids  # each key exactly once
    assert sum(consumed) == 7 * len(ids)


# --- crash safety -------------------------------------------------------------------


def _complete_lines(path: Path) -> list[list[str]]:
    text = path.read_text()
    lines = text.split("\n")[:-1]  # a line cut by the kill has no newline: ignore it
    return [line.split() for line in lines]


def test_kill_9_loses_no_committed_key_and_never_redelivers(tmp_path: Path) -> None:
    rng = random.Random(4242)
    path = tmp_path / "kms.sqlite"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    kills = 8
    puts: list[str] = []
    delivered: list[str] = []
    block_lines: list[int] = []
    takes: list[tuple[int, int, str]] = []
    for run in range(kills):
        out, err = tmp_path / f"run{run}.out", tmp_path / f"run{run}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, str(CHILD), str(path), str(run)], stdout=stdout, stderr=stderr, cwd=ROOT, env=env
            )
        try:
            deadline = time.monotonic() + 30
            # the first kill may hit start-up (creating the schema); later ones hit the loop
            while run > 0 and out.stat().st_size == 0:
                assert child.poll() is None, err.read_text()
                assert time.monotonic() < deadline, "the child did not start"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3) if run > 0 else rng.uniform(0.02, 0.15))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert child.returncode == -signal.SIGKILL, err.read_text()
        for word, *rest in _complete_lines(out):
            if word == "PUT":
                puts.append(rest[0])
            elif word == "DELIVERED":
                delivered.append(rest[0])
            elif word == "BLOCK":
                block_lines.append(int(rest[0]))
            elif word == "TOOK":
                takes.append((int(rest[0]), int(rest[1]), rest[2]))

    assert len(delivered) > 20 and len(takes) > 20  # the runs did real work
    with KeyStore(path, "alice") as s:
        assert s.integrity_check() == "ok"
        assert len(delivered) == len(set(delivered))  # never delivered twice
        for key_id in delivered:
            with pytest.raises(KeyConsumed):
                s.get_key(key_id)
            with pytest.raises(KeyConsumed):
                s.deliver(key_id, "alice-app")
        for key_id in puts:  # every reported put is still there, in some state
            try:
                assert s.get_key(key_id).state in (KeyState.READY, KeyState.ASSIGNED)
            except KeyConsumed:
                pass
        # A kill can fall between a commit and its line: at most one such call per kill.
        stats = s.key_statistics()["bob"]
        assert 0 <= sum(stats.values()) - len(set(puts)) <= kills
        assert 0 <= stats["delivered"] - len(delivered) <= kills
        assert stats["assigned"] <= kills  # taken but killed before deliver
        # link material: blocks reported are stored, takes never overlap and match the data
        link = s.link_statistics("bob")
        assert all(a < b for a, b in zip(block_lines, block_lines[1:]))
        assert 0 <= link.blocks - len(block_lines) <= kills  # ids missing from the lines: unreported adds
        assert block_lines[-1] < link.blocks
        own = b"".join(block_bytes(i)[: BLOCK_BYTES // 2] for i in range(link.blocks))  # alice < bob
        positions = [pos for pos, _n, _digest in takes]
        assert all(a < b for a, b in zip(positions, positions[1:]))
        for pos, n, digest in takes:
            assert n == TAKE_BYTES and pos % TAKE_BYTES == 0
            assert hashlib.sha256(own[pos : pos + n]).hexdigest() == digest
        unreported = (link.own_taken_bytes - TAKE_BYTES * len(takes)) / TAKE_BYTES
        assert 0 <= unreported <= kills and link.own_taken_bytes >= positions[-1] + TAKE_BYTES
        # the store goes on working: the remaining READY keys are handed out once each
        ready = s.count_keys("bob", "alice")
        rest = s.take_ready("bob", "alice", ready, 256, master_sae="alice-app")
        handed = [s.deliver(k.key_id, "alice-app").key_id for k in rest]
        assert len(handed) == ready
        assert not set(handed) & set(delivered)
