"""Child process of the kill -9 test in test_kms_store.py (not a test module).

Usage: python _kms_store_child.py DB_PATH RUN

Loops until killed, on the store of node "alice" (peer KME and link peer "bob"), and
prints a line only *after* the call it reports has committed:

    PUT <key_id>                      put_key committed
    DELIVERED <key_id>                take_ready + deliver committed
    BLOCK <block_id>                  add_link_block committed
    TOOK <pos> <n> <sha256 hex>       take_own committed (hash of the bytes, test data only)

Link blocks are test data derived from the block id (`block_bytes`), so the parent can
recompute what every take must have returned.
"""

from __future__ import annotations

import hashlib
import os
import sys
import uuid

from nodes.kms.store import KeyExhausted, KeyStore

BLOCK_BYTES = 64
TAKE_BYTES = 16


def block_bytes(block_id: int) -> bytes:
    return hashlib.sha512(b"qnetem kms crash test block %d" % block_id).digest()[:BLOCK_BYTES]


def main() -> None:
    path, run = sys.argv[1], int(sys.argv[2])
    store = KeyStore(path, "alice")
    next_block = store.link_statistics("bob").blocks  # blocks are 0, 1, 2, ...: continue after a crash
    i = 0
    while True:
        now = run * 1e6 + i
        key_id = uuid.uuid4()
        store.put_key(str(key_id), "bob", os.urandom(32), owner="alice", origin="link", now=now)
        print(f"PUT {key_id}", flush=True)
        if i % 3 != 2:  # deliver two keys out of three: READY keys accumulate across runs
            try:
                [taken] = store.take_ready("bob", "alice", 1, 256, master_sae="alice-app")
            except KeyExhausted:
                pass
            else:
                store.deliver(taken.key_id, "alice-app")
                print(f"DELIVERED {taken.key_id}", flush=True)
        store.add_link_block("bob", next_block, block_bytes(next_block), now)
        print(f"BLOCK {next_block}", flush=True)
        next_block += 1
        pos, data = store.take_own("bob", TAKE_BYTES)
        print(f"TOOK {pos} {len(data)} {hashlib.sha256(data).hexdigest()}", flush=True)
        i += 1


if __name__ == "__main__":
    main()
