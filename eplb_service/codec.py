"""``eplb.v1.Tensor`` <-> numpy, with strict validation.

A Tensor is raw little-endian bytes in C order plus a dtype and a shape (never repeated
scalars). :func:`decode` checks everything a hostile or buggy peer could get wrong and raises
:class:`CodecError` naming the field (``report.counts.shape`` ...) so the service can refuse the
message with INVALID_ARGUMENT and a useful text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from eplb_proto.v1 import eplb_pb2

# Wire dtype -> little-endian numpy dtype.
DTYPES: dict[int, np.dtype[Any]] = {
    eplb_pb2.DTYPE_INT32: np.dtype("<i4"),
    eplb_pb2.DTYPE_INT64: np.dtype("<i8"),
}
_WIRE_OF: dict[str, eplb_pb2.DType] = {"int32": eplb_pb2.DTYPE_INT32, "int64": eplb_pb2.DTYPE_INT64}


class CodecError(ValueError):
    """A Tensor is malformed. ``reason`` is a short metric label (dtype, shape, length, ...)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def dtype_name(value: int) -> str:
    """``DTYPE_INT32`` for 1, ``7`` for an unknown number."""
    try:
        return eplb_pb2.DType.Name(value)
    except ValueError:
        return str(value)


def decode(
    tensor: eplb_pb2.Tensor,
    name: str,
    *,
    shape: Sequence[int] | None = None,
    nonnegative: bool = False,
) -> npt.NDArray[np.int64]:
    """Decodes a Tensor to a fresh, writable ``int64`` array of its shape.

    Args:
        tensor: the message.
        name: the field path for error messages, e.g. ``"report.counts"``.
        shape: the required shape (e.g. ``[L, P]``); None accepts any non-empty shape.
        nonnegative: refuse negative values.

    Raises:
        CodecError: unknown dtype, wrong shape, byte length != prod(shape) * itemsize, or a
            negative value when ``nonnegative``; the message names ``name`` and the first
            offending index.
    """
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        known = " or ".join(eplb_pb2.DType.Name(k) for k in DTYPES)
        raise CodecError(
            f"{name}.dtype: unsupported dtype {dtype_name(tensor.dtype)}; expected {known}",
            "dtype",
        )
    got = tuple(int(d) for d in tensor.shape)
    if shape is not None and got != tuple(shape):
        raise CodecError(
            f"{name}.shape: got {list(got)}, expected {list(shape)}", "shape"
        )
    if not got:
        raise CodecError(f"{name}.shape: must have at least one dimension", "shape")
    count = 1
    for d in got:
        count *= d
    expected_bytes = count * dtype.itemsize
    if len(tensor.data) != expected_bytes:
        raise CodecError(
            f"{name}.data: {len(tensor.data)} bytes, expected {expected_bytes} "
            f"(shape {list(got)} x {dtype.itemsize} bytes of {dtype_name(tensor.dtype)})",
            "length",
        )
    arr = np.frombuffer(tensor.data, dtype=dtype).reshape(got).astype(np.int64)
    if nonnegative and count and arr.min() < 0:
        index = tuple(int(i) for i in np.argwhere(arr < 0)[0])
        where = "".join(f"[{i}]" for i in index)
        raise CodecError(f"{name}{where} = {int(arr[index])} is negative", "negative")
    return arr


def encode(array: npt.ArrayLike, dtype: str = "int64") -> eplb_pb2.Tensor:
    """Encodes an integer array as a Tensor (``dtype`` ``"int64"`` or ``"int32"``).

    Raises:
        ValueError: for a non-integer array, an unknown dtype, or values that do not fit.
    """
    wire = _WIRE_OF.get(dtype)
    if wire is None:
        raise ValueError(f"dtype must be 'int32' or 'int64', got {dtype!r}")
    arr = np.asarray(array)
    if arr.dtype.kind not in "iub":
        raise ValueError(f"can only encode integer arrays, got dtype {arr.dtype}")
    target = DTYPES[wire]
    if arr.size and dtype == "int32" and (arr.min() < -(2**31) or arr.max() >= 2**31):
        raise ValueError("values do not fit in int32")
    data = np.ascontiguousarray(arr, dtype=target).tobytes()
    return eplb_pb2.Tensor(dtype=wire, shape=[int(d) for d in arr.shape], data=data)
