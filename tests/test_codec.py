"""Tensor <-> numpy: dtype, shape, little-endian bytes, strict validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_proto.v1 import eplb_pb2
from eplb_service.codec import CodecError, decode, encode


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_round_trip(dtype):
    arr = np.arange(12).reshape(3, 4) - 3
    tensor = encode(arr, dtype)
    assert list(tensor.shape) == [3, 4]
    assert len(tensor.data) == 12 * (4 if dtype == "int32" else 8)
    out = decode(tensor, "t", shape=(3, 4))
    assert out.dtype == np.int64 and out.flags.writeable
    np.testing.assert_array_equal(out, arr)


def test_bytes_are_little_endian_c_order():
    tensor = encode(np.array([[1, 2], [3, 256]]), "int32")
    assert tensor.data == bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 1, 0, 0])
    big_endian = np.array([[1, 2]], dtype=">i8")
    np.testing.assert_array_equal(decode(encode(big_endian), "t"), [[1, 2]])


def test_non_contiguous_input():
    arr = np.arange(20).reshape(4, 5)[:, ::2]
    np.testing.assert_array_equal(decode(encode(arr), "t"), arr)


@pytest.mark.parametrize(
    ("tensor", "text", "reason"),
    [
        (eplb_pb2.Tensor(dtype=0, shape=[1], data=b"\0" * 8),
         "x.dtype: unsupported dtype DTYPE_UNSPECIFIED; expected DTYPE_INT32 or DTYPE_INT64",
         "dtype"),
        (eplb_pb2.Tensor(dtype=7, shape=[1], data=b"\0" * 8), "unsupported dtype 7", "dtype"),
        (eplb_pb2.Tensor(dtype=2, shape=[2, 3], data=b"\0" * 48),
         "x.shape: got [2, 3], expected [3, 2]", "shape"),
        (eplb_pb2.Tensor(dtype=2, shape=[3, 2], data=b"\0" * 47),
         "x.data: 47 bytes, expected 48 (shape [3, 2] x 8 bytes of DTYPE_INT64)", "length"),
        (eplb_pb2.Tensor(dtype=1, shape=[3, 2], data=b"\0" * 48),
         "x.data: 48 bytes, expected 24", "length"),
        (eplb_pb2.Tensor(dtype=1, shape=[3, 2],
                         data=np.array([0, 0, 0, 0, 0, -1], "<i4").tobytes()),
         "x[2][1] = -1 is negative", "negative"),
    ],
)
def test_decode_errors_name_the_field(tensor, text, reason):
    with pytest.raises(CodecError) as err:
        decode(tensor, "x", shape=(3, 2), nonnegative=True)
    assert text in str(err.value)
    assert err.value.reason == reason


def test_empty_shape_refused():
    with pytest.raises(CodecError, match="at least one dimension"):
        decode(eplb_pb2.Tensor(dtype=2, shape=[], data=b""), "x")


def test_negative_allowed_unless_asked():
    tensor = encode(np.array([-1, 2]))
    np.testing.assert_array_equal(decode(tensor, "x"), [-1, 2])


def test_encode_errors():
    with pytest.raises(ValueError, match="dtype must be"):
        encode(np.zeros(2, dtype=np.int64), "int16")
    with pytest.raises(ValueError, match="integer"):
        encode(np.zeros(2))
    with pytest.raises(ValueError, match="int32"):
        encode(np.array([2**31]), "int32")


@settings(max_examples=100, deadline=None)
@given(
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    dtype=st.sampled_from(["int32", "int64"]),
    data=st.data(),
)
def test_round_trip_property(shape, dtype, data):
    bound = 2**31 - 1 if dtype == "int32" else 2**63 - 1
    size = int(np.prod(shape))
    values = data.draw(st.lists(st.integers(-bound - 1, bound), min_size=size, max_size=size))
    arr = np.array(values, dtype=np.int64).reshape(shape)
    np.testing.assert_array_equal(decode(encode(arr, dtype), "t", shape=shape), arr)


@settings(max_examples=200, deadline=None)
@given(dtype=st.integers(0, 5), shape=st.lists(st.integers(0, 70000), max_size=4),
       data=st.binary(max_size=64))
def test_arbitrary_tensors_decode_or_raise_codec_error(dtype, shape, data):
    tensor = eplb_pb2.Tensor(dtype=dtype, shape=shape, data=data)
    try:
        out = decode(tensor, "x", nonnegative=True)
    except CodecError:
        return
    assert list(out.shape) == shape
