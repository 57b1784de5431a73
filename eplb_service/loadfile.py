"""Reading expert loads and placements from files, and writing placements.

Formats, chosen by the file suffix:

- load ``[L, E]`` (:func:`read_load`):
  ``.npy``; ``.json`` as SGLang's expert-distribution recorder writes it
  (``{"logical_count": [[...]]}``) or a bare nested list; ``.pt``/``.pth`` (torch, imported only
  here) holding a tensor or a dict with ``"logical_count"``. A 3-D load ``[steps, L, E]`` (SGLang
  ``stat`` dumps keep one row per buffered step) is summed over its first axis.
- placement ``phy2log [L, P]`` (:func:`read_phy2log`, :func:`read_placement`): ``.npy``;
  ``.json`` ``{"physical_to_logical_map": [[...]]}`` (SGLang ``--init-expert-location``) or a bare
  nested list; ``.pt``/``.pth`` holding a tensor or a dict with that key.
- written placements (:func:`write_placement`): ``.npy`` (int64) or ``.json`` in exactly SGLang's
  ``--init-expert-location`` form (SGLang passes every key on as an argument, so no extra keys).

Every problem raises :class:`LoadFileError` (a ``ValueError``) or, for a map that does not fit the
topology, :class:`~eplb_service.placement.PlacementError`; the message starts with the file name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from eplb_service.balance import FloatArray, as_load
from eplb_service.placement import IntArray, Placement, PlacementError, Topology, as_int_array

LOAD_KEY = "logical_count"
MAP_KEY = "physical_to_logical_map"
TORCH_SUFFIXES = (".pt", ".pth")
READ_SUFFIXES = (".npy", ".json", *TORCH_SUFFIXES)
WRITE_SUFFIXES = (".npy", ".json")


class LoadFileError(ValueError):
    """A file cannot be read or written as asked; the message names the file and the problem."""


def _suffix(path: Path, allowed: tuple[str, ...]) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise LoadFileError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(allowed)}"
        )
    return suffix


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise LoadFileError(f"{path}: no such file")
    if not path.is_file():
        raise LoadFileError(f"{path}: not a regular file")


_NPY_MAGIC = b"\x93NUMPY"
_MAX_DETAIL = 200  # characters of a library's error message kept in ours


def _detail(exc: BaseException) -> str:
    """A library exception as one short line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _read_npy(path: Path) -> Any:
    try:
        with path.open("rb") as fh:
            if fh.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
                raise LoadFileError(f"{path}: not a .npy file (no NumPy header)")
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        if isinstance(exc, LoadFileError):
            raise
        raise LoadFileError(f"{path}: not a readable .npy file: {_detail(exc)}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LoadFileError(f"{path}: not a JSON file (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise LoadFileError(f"{path}: invalid JSON: {_detail(exc)}") from None
    except OSError as exc:
        raise LoadFileError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _read_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise LoadFileError(f"{path}: reading .pt files needs torch (not installed)") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a bad file
        if "Weights only load failed" in str(exc):
            raise LoadFileError(
                f"{path}: not a torch file of plain tensors/dicts (corrupt, or holds objects "
                "that torch.load(weights_only=True) refuses)"
            ) from None
        raise LoadFileError(f"{path}: not a readable torch file: {_detail(exc)}") from None


def _read_raw(path: Path, allowed: tuple[str, ...]) -> tuple[str, Any]:
    suffix = _suffix(path, allowed)
    _check_readable(path)
    if suffix == ".npy":
        return suffix, _read_npy(path)
    if suffix == ".json":
        return suffix, _read_json(path)
    return suffix, _read_torch(path)


def _unwrap(path: Path, data: Any, key: str) -> Any:
    """The value under ``key`` of a JSON object / torch dict, else ``data`` itself."""
    if isinstance(data, dict):
        if key not in data:
            found = ", ".join(repr(k) for k in list(data)[:5]) or "none"
            raise LoadFileError(f"{path}: expected the key {key!r}; found keys: {found}")
        return data[key]
    if isinstance(data, (str, int, float, bool)) or data is None:
        raise LoadFileError(
            f"{path}: expected a nested list or an object with {key!r}, got {type(data).__name__}"
        )
    return data


def read_load(path: str | Path) -> FloatArray:
    """Reads a load file.

    Args:
        path: ``.npy``, ``.json``, ``.pt`` or ``.pth`` file (see the module docstring).

    Returns:
        ``[L, E]`` float64, finite and non-negative (a ``[steps, L, E]`` file summed over steps).

    Raises:
        LoadFileError: naming the file: missing, unreadable, wrong shape, negative or NaN loads.
    """
    path = Path(path)
    _, data = _read_raw(path, READ_SUFFIXES)
    value = _unwrap(path, data, LOAD_KEY)
    try:
        arr = _as_float_array(value)
    except ValueError as exc:
        raise LoadFileError(f"{path}: {LOAD_KEY} must be a numeric array: {exc}") from None
    if arr.ndim == 3:
        arr = arr.sum(axis=0)
    if arr.ndim != 2:
        raise LoadFileError(
            f"{path}: load must be 2-D [layers, experts] (or 3-D [steps, layers, experts]), "
            f"got shape {tuple(arr.shape)}"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise LoadFileError(f"{path}: load is empty, shape {tuple(arr.shape)}")
    try:
        return as_load(arr, "load")
    except ValueError as exc:
        raise LoadFileError(f"{path}: {exc}") from None


def _as_float_array(value: Any) -> FloatArray:
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu().double().numpy()
    arr = np.asarray(value)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        kind = "a ragged or non-numeric" if arr.dtype == object else f"a {arr.dtype}"
        raise ValueError(f"got {kind} array")
    return arr.astype(np.float64)


def read_phy2log(path: str | Path) -> IntArray:
    """Reads a placement map.

    Args:
        path: ``.npy``, ``.json``, ``.pt`` or ``.pth`` file (see the module docstring).

    Returns:
        ``[L, P]`` int64 (not yet validated against a topology: see :func:`read_placement`).

    Raises:
        LoadFileError: naming the file: missing, unreadable, not integers, not 2-D.
    """
    path = Path(path)
    _, data = _read_raw(path, READ_SUFFIXES)
    value = _unwrap(path, data, MAP_KEY)
    try:
        arr = as_int_array(value, MAP_KEY)
    except PlacementError as exc:
        raise LoadFileError(f"{path}: {exc}") from None
    if arr.ndim != 2:
        raise LoadFileError(
            f"{path}: {MAP_KEY} must be 2-D [layers, slots], got shape {tuple(arr.shape)}"
        )
    return arr


def read_placement(path: str | Path, topology: Topology) -> Placement:
    """Reads a placement map and validates it against ``topology``.

    Returns:
        The :class:`Placement` (``phy2log [L, P]``).

    Raises:
        LoadFileError: the file cannot be read as a map.
        PlacementError: the map does not fit ``topology``; the message starts with the file name.
    """
    phy2log = read_phy2log(path)
    try:
        return Placement(phy2log, topology)
    except PlacementError as exc:
        raise PlacementError(f"{path}: {exc}") from None


def check_writable(path: str | Path) -> Path:
    """Checks that a placement can be written to ``path`` (suffix and folder), before planning.

    Raises:
        LoadFileError: unsupported suffix or missing folder.
    """
    path = Path(path)
    _suffix(path, WRITE_SUFFIXES)
    folder = path.parent
    if not folder.is_dir():
        raise LoadFileError(f"{path}: folder {folder} does not exist")
    if path.is_dir():
        raise LoadFileError(f"{path}: is a folder")
    return path


def write_placement(path: str | Path, placement: Placement) -> Path:
    """Writes ``placement.phy2log [L, P]`` as ``.npy`` (int64) or SGLang JSON.

    Raises:
        LoadFileError: unsupported suffix, or the file cannot be written.
    """
    path = check_writable(path)
    try:
        if path.suffix.lower() == ".npy":
            with path.open("wb") as fh:  # np.save(path) would append .npy to other suffixes
                np.save(fh, placement.phy2log)
        else:
            path.write_text(json.dumps(placement.to_json()) + "\n", encoding="utf-8")
    except OSError as exc:
        raise LoadFileError(f"{path}: cannot write: {exc.strerror or exc}") from None
    return path
