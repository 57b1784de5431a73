"""numpy <-> ``eplb.v1.Tensor``: dense integer arrays as raw little-endian bytes.

The agent's half of the wire format (``worker_agent`` must not import ``eplb_service``). A
``Tensor`` is ``dtype`` + ``shape`` + ``data``: the C-order bytes of the array, little-endian,
never repeated scalars.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from eplb_proto.v1 import eplb_pb2

__all__ = ["CodecError", "decode", "encode", "encode_counts"]

_TO_NUMPY: dict[eplb_pb2.DType, np.dtype[np.signedinteger]] = {
    eplb_pb2.DTYPE_INT32: np.dtype("<i4"),
    eplb_pb2.DTYPE_INT64: np.dtype("<i8"),
}
_FROM_NUMPY = {dtype.str: code for code, dtype in _TO_NUMPY.items()}
_INT32_MAX = np.iinfo(np.int32).max


class CodecError(ValueError):
    """A ``Tensor`` message that does not describe a valid array; the message says why."""


def encode(array: npt.NDArray[np.integer]) -> eplb_pb2.Tensor:
    """An int32 or int64 array of any shape -> ``Tensor`` (little-endian, C order)."""
    dtype = array.dtype.newbyteorder("<")
    code = _FROM_NUMPY.get(dtype.str)
    if code is None:
        raise CodecError(f"cannot encode dtype {array.dtype}: only int32 and int64")
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return eplb_pb2.Tensor(dtype=code, shape=list(array.shape), data=data)


def encode_counts(counts: npt.NDArray[np.int64], total: int | None = None) -> eplb_pb2.Tensor:
    """Load counts ``[L, P]`` (>= 0) -> ``Tensor``: int32 when every value fits (half the bytes).

    ``total``: ``counts.sum()`` when the caller knows it; a non-negative total that fits in
    int32 bounds every entry, which saves a pass over the array.
    """
    fits = total is not None and total <= _INT32_MAX
    if not fits and counts.size and int(counts.max()) > _INT32_MAX:
        return encode(counts.astype(np.int64, copy=False))
    return encode(counts.astype(np.int32))


def decode(tensor: eplb_pb2.Tensor, *, name: str = "tensor") -> npt.NDArray[np.int64]:
    """``Tensor`` -> a fresh, writable int64 numpy array of its shape.

    Raises:
        CodecError: unknown dtype, or ``data`` whose length does not match ``shape``; the
            message starts with ``name``.
    """
    dtype = _TO_NUMPY.get(tensor.dtype)
    if dtype is None:
        raise CodecError(f"{name}: unsupported dtype {tensor.dtype} (int32 or int64 only)")
    shape = tuple(int(d) for d in tensor.shape)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise CodecError(
            f"{name}: shape {list(shape)} of {dtype.name} needs {expected} bytes, "
            f"got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(np.int64)
