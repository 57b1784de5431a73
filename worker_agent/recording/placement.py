"""Placement view: the device-resident expert map of one rank, updated in place at a switch.

Shapes (``L`` MoE layers, ``E`` logical experts, ``P`` physical slots, ``X = P - E + 1``):

- ``phy2log [L, P] int64``: logical expert held by each slot.
- ``log2phy [L, E, X] int64``: slots holding each logical expert, in slot order, ``-1`` padded.
  ``X = P - E + 1`` is the most replicas one expert can have when every expert has at least one,
  so the shape never changes whatever the placement.
- ``logcnt [L, E] int64``: replica count of each logical expert (``>= 1``).
- ``replica_table [L, E, 1 + X] int32``: ``[logcnt, log2phy...]`` packed per expert, what the
  kernels read (the count and the replica slot usually share one cache line).

The three device tensors keep their addresses for the life of the view: ``update_`` and
``update_layers_`` copy new contents into them, so CUDA graphs captured against them stay valid.
Validation and the derivation of ``log2phy``/``logcnt`` run on the host (numpy) on the control
path, never in the forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["PlacementView", "derive_maps", "pack_table", "validate_phy2log"]


def _as_int64_array(phy2log: Any, what: str) -> np.ndarray:
    if isinstance(phy2log, torch.Tensor):
        if phy2log.is_floating_point() or phy2log.is_complex() or phy2log.dtype == torch.bool:
            raise ValueError(f"{what}: expected an integer tensor, got {phy2log.dtype}")
        arr = phy2log.detach().to("cpu", torch.int64).numpy()
    else:
        arr = np.asarray(phy2log)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{what}: expected an integer array, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
    return np.ascontiguousarray(arr)


def validate_phy2log(phy2log: np.ndarray, num_experts: int, num_slots: int | None = None) -> None:
    """Raise ``ValueError`` naming the problem unless ``phy2log [L, P]`` is a valid placement.

    Checks: 2-D; ``P`` equals ``num_slots`` when given; ``P >= E``; every value in ``[0, E)``;
    every logical expert of every layer has at least one replica.
    """
    if phy2log.ndim != 2:
        raise ValueError(f"phy2log: expected shape [L, P], got {tuple(phy2log.shape)}")
    num_layers, slots = phy2log.shape
    if num_slots is not None and slots != num_slots:
        raise ValueError(f"phy2log: expected {num_slots} slots per layer, got {slots}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if slots < num_experts:
        raise ValueError(f"phy2log: {slots} slots cannot hold {num_experts} experts")
    if num_layers == 0:
        return
    bad = (phy2log < 0) | (phy2log >= num_experts)
    if bad.any():
        layer, slot = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"phy2log: layer {layer} slot {slot} holds expert {int(phy2log[layer, slot])}, "
            f"outside [0, {num_experts})"
        )
    counts = _logcnt(phy2log, num_experts)
    missing = counts == 0
    if missing.any():
        layer, expert = (int(v) for v in np.argwhere(missing)[0])
        raise ValueError(f"phy2log: layer {layer} has no replica of expert {expert}")


def _logcnt(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    num_layers = phy2log.shape[0]
    flat = (phy2log + np.arange(num_layers, dtype=np.int64)[:, None] * num_experts).ravel()
    return np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts)


def pack_table(log2phy: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
    """``(log2phy [L, E, X], logcnt [L, E])`` -> ``replica_table [L, E, 1 + X]`` int32."""
    return np.concatenate([logcnt[..., None], log2phy], axis=-1).astype(np.int32)


def derive_maps(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """``phy2log [L, P]`` (valid) -> ``(log2phy [L, E, P-E+1], logcnt [L, E])``, both int64.

    Replicas of an expert are listed in increasing slot order; unused entries are ``-1``.
    """
    num_layers, slots = phy2log.shape
    width = slots - num_experts + 1
    logcnt = _logcnt(phy2log, num_experts).astype(np.int64)
    log2phy = np.full((num_layers, num_experts, width), -1, dtype=np.int64)
    if num_layers == 0:
        return log2phy, logcnt
    order = np.argsort(phy2log, axis=1, kind="stable")  # slots grouped by expert, slot order kept
    experts = np.take_along_axis(phy2log, order, axis=1)
    first = np.cumsum(logcnt, axis=1) - logcnt  # [L, E]: position of each expert's first replica
    rows = np.arange(num_layers)[:, None]
    rank = np.arange(slots)[None, :] - first[rows, experts]
    log2phy[rows, experts, rank] = order
    return log2phy, logcnt


class PlacementView:
    """Device tensors of one placement version, updated in place (fixed addresses).

    Args:
        phy2log: ``[L, P]`` integer tensor or array.
        num_experts: ``E``, logical experts per layer.
        device: where the tensors live; default: ``phy2log``'s device for a tensor, else CPU.
        version: placement version of ``phy2log`` (host-side int).

    Attributes: ``phy2log [L, P]``, ``log2phy [L, E, P-E+1]``, ``logcnt [L, E]`` (int64, on
    ``device``), ``replica_table [L, E, P-E+2]`` (int32, the kernels' packed copy), ``version``,
    ``num_layers``, ``num_experts``, ``num_slots``, ``device``.

    Updates are called on the engine thread at a step boundary; copies are enqueued on the current
    stream (from pinned memory on CUDA), so they are ordered before the next forward's kernels.
    """

    def __init__(
        self,
        phy2log: Any,
        num_experts: int,
        *,
        device: torch.device | str | None = None,
        version: int = 0,
    ) -> None:
        if device is None:
            device = phy2log.device if isinstance(phy2log, torch.Tensor) else "cpu"
        self.device = torch.device(device)
        host = _as_int64_array(phy2log, "phy2log")
        validate_phy2log(host, num_experts)
        self.num_layers: int = int(host.shape[0])
        self.num_slots: int = int(host.shape[1])
        self.num_experts: int = int(num_experts)
        log2phy, logcnt = derive_maps(host, num_experts)
        self._host_phy2log = host.copy()
        self.phy2log = torch.from_numpy(host.copy()).to(self.device)
        self.log2phy = torch.from_numpy(log2phy).to(self.device)
        self.logcnt = torch.from_numpy(logcnt).to(self.device)
        self.replica_table = torch.from_numpy(pack_table(log2phy, logcnt)).to(self.device)
        self.version: int = int(version)
        self.updates: int = 0  # number of update_/update_layers_ calls so far

    @property
    def max_replicas(self) -> int:
        """``X = P - E + 1``, the last dimension of ``log2phy``."""
        return self.num_slots - self.num_experts + 1

    def host_phy2log(self) -> np.ndarray:
        """A copy of the current ``phy2log [L, P]`` as a host int64 array (no device access)."""
        return self._host_phy2log.copy()

    def update_(self, phy2log: Any, version: int) -> None:
        """Validate ``phy2log [L, P]`` and copy it (and its derived maps) in place; set ``version``.

        Raises ``ValueError`` (shape, range, an expert without replica) and leaves the view as it
        was.
        """
        host = _as_int64_array(phy2log, "phy2log")
        if host.ndim != 2 or host.shape[0] != self.num_layers:
            raise ValueError(
                f"phy2log: expected shape [{self.num_layers}, {self.num_slots}], "
                f"got {tuple(host.shape)}"
            )
        validate_phy2log(host, self.num_experts, self.num_slots)
        log2phy, logcnt = derive_maps(host, self.num_experts)
        self._copy_in(self.phy2log, host)
        self._copy_in(self.log2phy, log2phy)
        self._copy_in(self.logcnt, logcnt)
        self._copy_in(self.replica_table, pack_table(log2phy, logcnt))
        self._host_phy2log = host.copy()
        self.version = int(version)
        self.updates += 1

    def update_layers_(
        self, layers: Sequence[int], phy2log: Any, version: int | None = None
    ) -> None:
        """Replace the maps of the given layers in place.

        ``phy2log`` is either the full ``[L, P]`` map (rows taken at ``layers``) or
        ``[len(layers), P]`` rows in the order of ``layers`` (when ``len(layers) == L`` the full-map
        reading wins). ``version``, when given, becomes the view's version; a partial switch that
        changes what the engine routes should bump it so counts stay attributable.
        """
        idx = [int(v) for v in layers]
        if len(set(idx)) != len(idx):
            raise ValueError(f"layers: duplicate layer index in {idx}")
        for layer in idx:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"layers: layer {layer} outside [0, {self.num_layers})")
        host = _as_int64_array(phy2log, "phy2log")
        if host.ndim != 2:
            raise ValueError(f"phy2log: expected a 2-D map, got shape {tuple(host.shape)}")
        if host.shape[0] == self.num_layers:
            rows = host[idx]
        elif host.shape[0] == len(idx):
            rows = host
        else:
            raise ValueError(
                f"phy2log: expected [{self.num_layers}, {self.num_slots}] or "
                f"[{len(idx)}, {self.num_slots}], got {tuple(host.shape)}"
            )
        try:
            validate_phy2log(rows, self.num_experts, self.num_slots)
        except ValueError as exc:  # name the real layer, not the row index
            raise ValueError(f"{exc} (rows are layers {idx})") from None
        if not idx:
            if version is not None:
                self.version = int(version)
            return
        log2phy, logcnt = derive_maps(rows, self.num_experts)
        table = pack_table(log2phy, logcnt)
        for i, layer in enumerate(idx):
            self._copy_in(self.phy2log[layer], rows[i])
            self._copy_in(self.log2phy[layer], log2phy[i])
            self._copy_in(self.logcnt[layer], logcnt[i])
            self._copy_in(self.replica_table[layer], table[i])
            self._host_phy2log[layer] = rows[i]
        if version is not None:
            self.version = int(version)
        self.updates += 1

    def _copy_in(self, dst: torch.Tensor, src: np.ndarray) -> None:
        source = torch.from_numpy(np.ascontiguousarray(src))
        if dst.is_cuda:
            # Pinned staging through torch's caching host allocator: the copy is asynchronous
            # and the block is not reused before the copy has run.
            dst.copy_(source.pin_memory(), non_blocking=True)
        else:
            dst.copy_(source)

    def __repr__(self) -> str:
        return (
            f"PlacementView(L={self.num_layers}, E={self.num_experts}, P={self.num_slots}, "
            f"version={self.version}, device={self.device})"
        )
