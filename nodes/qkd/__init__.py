"""QKD post-processing of one link (DESIGN §7), each stage a sans-IO object.

Stages in place: sifting of the broker's detections against the transmitter's choices
(`sifting`), decoy-state parameter estimation with abort and alarm (`estimation`),
reconciliation (`cascade`), verification of the corrected key (`verification`), privacy
amplification by Toeplitz hashing (`amplification`) and Wegman–Carter authentication of
post-processing messages (`authentication`). The link session that runs them over the
classical link, fed by the broker's `qkd_detections`, is still to be built (issue 4).
"""
