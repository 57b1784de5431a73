"""Array types and map helpers shared by the placement policies (numpy only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def _flat_index(index: IntArray, width: int) -> IntArray:
    """[X, k] column indices into rows of ``width`` -> [X, k] indices into the flattened rows."""
    return index + (np.arange(index.shape[0], dtype=np.int64) * width)[:, None]


def gather_rows(values: npt.NDArray[Any], index: IntArray) -> npt.NDArray[Any]:
    """Row-wise gather (``np.take_along_axis(values, index, axis=1)``, several times faster).

    Parameters:
        values: [X, n]
        index: [X, k], column indices into ``values``

    Returns:
        out: [X, k], with out[x, i] = values[x, index[x, i]]
    """
    return values.reshape(-1)[_flat_index(index, values.shape[1])]


def scatter_rows(index: IntArray, values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Row-wise scatter through a permutation (inverse of :func:`gather_rows`).

    Parameters:
        index: [X, n], each row a permutation of 0..n-1
        values: [X, n]

    Returns:
        out: [X, n], with out[x, index[x, i]] = values[x, i]
    """
    out = np.empty(index.shape, dtype=values.dtype)
    out.reshape(-1)[_flat_index(index, index.shape[1])] = values
    return out


def inverse_permutation(perm: IntArray) -> IntArray:
    """Inverts a permutation of every row.

    Parameters:
        perm: [X, n], each row a permutation of 0..n-1

    Returns:
        inv: [X, n], with inv[x, perm[x, i]] = i
    """
    columns = np.broadcast_to(np.arange(perm.shape[1], dtype=np.int64), perm.shape)
    return scatter_rows(perm, columns)


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
    log2phy.reshape(-1)[_flat_index(phy2log * width + phy_rank, num_logical * width)] = slots
    return log2phy.reshape(num_layers, num_logical, width)
