"""QKD post-processing of one link (DESIGN §7), each stage a sans-IO object.

Stages in place: sifting of the broker's detections against the transmitter's choices
(`sifting`), decoy-state parameter estimation with abort and alarm (`estimation`),
reconciliation (`cascade`), verification of the corrected key (`verification`), privacy
amplification by Toeplitz hashing (`amplification`) and Wegman–Carter authentication of
post-processing messages (`authentication`). `session` composes them per block for one
end of a link (authenticated envelopes, key added to a `keypool.KeyPool` that both ends
fill identically). The `qkd` app (nodes/apps/qkd.py) runs a session in a node, over the
classical link, with the node's `keypool.KeyPools`.
"""
