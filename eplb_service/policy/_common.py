"""Array types and map helpers shared by the placement policies (numpy only)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

# (phy2log [L, P], log2phy [L, E, P - E + 1], logcnt [L, E])
Placement = tuple[IntArray, IntArray, IntArray]

# A policy maps a checked float32 load [L, E] and the topology sizes
# (num_replicas, num_groups, num_nodes, num_gpus), plus policy-specific keyword options,
# to a placement.
PolicyFn = Callable[..., Placement]


def inverse_permutation(perm: IntArray) -> IntArray:
    """Inverts a permutation of every row.

    Parameters:
        perm: [X, n], each row a permutation of 0..n-1

    Returns:
        inv: [X, n], with inv[x, perm[x, i]] = i
    """
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def log2phy_from_ranks(phy2log: IntArray, phy_rank: IntArray, num_logical: int) -> IntArray:
    """Builds the logical-to-physical map from the slot map and each slot's replica rank.

    Parameters:
        phy2log: [L, P], logical expert of each slot
        phy_rank: [L, P], replica rank of each slot among its expert's replicas (0, 1, ...)
        num_logical: E, the number of logical experts

    Returns:
        log2phy: [L, E, P - E + 1], log2phy[l, e, k] is the slot of replica k of expert e,
            -1 where expert e has no k-th replica
    """
    num_layers, num_phy = phy2log.shape
    width = num_phy - num_logical + 1
    log2phy = np.full((num_layers, num_logical * width), -1, dtype=np.int64)
    slots = np.broadcast_to(np.arange(num_phy, dtype=np.int64), phy2log.shape)
    np.put_along_axis(log2phy, phy2log * width + phy_rank, slots, axis=1)
    return log2phy.reshape(num_layers, num_logical, width)
