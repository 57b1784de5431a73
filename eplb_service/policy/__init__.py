"""Placement policies: from per-expert load to a placement of replicas on slots.

:func:`rebalance_experts` checks the inputs, converts them to a float32 numpy load and runs a
policy from :data:`POLICIES`. To add a policy, write a module with a function of the
:data:`PolicyFn` form (a checked numpy float32 ``[L, E]`` load, the four sizes and the policy's
keyword options in; the ``(phy2log, log2phy, logcnt)`` int64 numpy triple out, where
:func:`~eplb_service.policy._common.log2phy_from_ranks` builds ``log2phy``) and add it to
:data:`POLICIES`.

torch is never imported at module load; torch input is detected by type and converted lazily.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from eplb_service.policy import deepseek, sticky
from eplb_service.policy._common import Placement, PolicyFn
from eplb_service.policy._inputs import as_load, check_sizes, like_input

__all__ = ["POLICIES", "Placement", "PolicyFn", "rebalance_experts"]

# name -> policy, read-only. To add one: import its module above and add an entry here.
POLICIES: Mapping[str, PolicyFn] = MappingProxyType(
    {
        "deepseek": deepseek.rebalance_experts,
        "sticky": sticky.rebalance_experts,
        "default": sticky.rebalance_experts,
    }
)


def rebalance_experts(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str = "default",
    **options: Any,
) -> tuple[Any, Any, Any]:
    """Plans a placement of ``num_replicas`` slots for the load ``weight``.

    Parameters:
        weight: [L, E], load of each logical expert per MoE layer: a numpy array, a torch
            tensor (any device, any dtype) or nested lists; finite and non-negative
        num_replicas: P, number of slots (physical experts), >= E and a multiple of num_gpus
        num_groups: G, number of expert groups, divides E
        num_nodes: N, number of nodes, divides num_gpus
        num_gpus: R, number of GPUs (EP ranks)
        policy: a name in :data:`POLICIES`
        **options: passed on to the policy

    Returns:
        phy2log: [L, P], the logical expert of each slot
        log2phy: [L, E, P - E + 1], the slots of each expert by replica rank, -1 padded
        logcnt: [L, E], the number of replicas of each expert
        All int64: torch tensors on ``weight``'s device for torch input, else numpy arrays.

    Raises:
        ValueError: naming the offending field, or listing the known policies.
    """
    fn = POLICIES.get(policy)
    if fn is None:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown policy {policy!r}; known policies: {known}")
    load = as_load(weight)
    check_sizes(load.shape[1], num_replicas, num_groups, num_nodes, num_gpus)
    placement = fn(
        load, int(num_replicas), int(num_groups), int(num_nodes), int(num_gpus), **options
    )
    phy2log, log2phy, logcnt = like_input(weight, placement)
    return phy2log, log2phy, logcnt
