"""example_proto: the pure-Python tf.train.Example parser against protobuf's own (tfds' copy)."""

import numpy as np
import pytest
from google.protobuf import message
from tensorflow_datasets.proto import tf_example_pb2

from cxr_jax.data import example_proto

KINDS = {"bytes_list": example_proto.BYTES_LIST, "float_list": example_proto.FLOAT_LIST,
         "int64_list": example_proto.INT64_LIST}
INT64_EDGES = [0, 1, -1, 127, 128, -128, 2**31, -2**31 - 1, 2**63 - 1, -2**63]


def random_features(rng) -> dict:
  """{name: (kind or None, values)}: every list kind, empty lists, edge values, no-kind features."""
  features = {}
  for i in range(int(rng.integers(0, 7))):
    name = rng.choice(["image", "labels", "bóxes", "", "x" * 200]) + str(i)
    kind = rng.choice([None, "bytes_list", "float_list", "int64_list"], p=[0.1, 0.3, 0.3, 0.3])
    n = int(rng.integers(0, 6))
    if kind == "bytes_list":
      sizes = rng.choice([0, 1, 5, 200, 70000], n)
      values = [rng.integers(0, 256, s, dtype=np.uint8).tobytes() for s in sizes]
    elif kind == "float_list":
      values = np.concatenate([rng.normal(size=n) * 1e3, rng.choice(
          [0.0, -0.0, np.inf, -np.inf, np.nan, 3e38, 1e-45], int(rng.integers(0, 3)))])
      values = values.astype(np.float32)
    elif kind == "int64_list":
      values = np.concatenate([rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64, endpoint=True),
                               rng.choice(INT64_EDGES, int(rng.integers(0, 4)))]).astype(np.int64)
    else:
      values = None
    features[name] = (kind, values)
  return features


def to_proto(features: dict) -> tf_example_pb2.Example:
  example = tf_example_pb2.Example()
  for name, (kind, values) in features.items():
    feature = example.features.feature[name]
    if kind is not None:
      getattr(feature, kind).value.extend(list(values))
  return example


def varint(value: int) -> bytes:
  value &= (1 << 64) - 1
  out = bytearray()
  while value >= 0x80:
    out.append(value & 0x7F | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def field(number: int, wire: int, payload: bytes) -> bytes:
  if wire == 2:
    payload = varint(len(payload)) + payload
  return varint(number << 3 | wire) + payload


def encode_by_hand(features: dict, rng) -> bytes:
  """Valid encodings protobuf's serializer never writes: unpacked and split packed runs,
  unknown fields between known ones."""
  unknown = lambda: field(15, 0, varint(int(rng.integers(0, 2**40)))) if rng.random() < 0.3 else b""
  entries = b""
  for name, (kind, values) in features.items():
    body = unknown()
    if kind == "bytes_list":
      body += b"".join(field(1, 2, v) + unknown() for v in values)
      body = field(KINDS[kind], 2, body)
    elif kind is not None:
      runs = np.split(np.asarray(values), np.sort(rng.integers(0, len(values) + 1, 2)))
      for run in runs:
        packed = rng.random() < 0.5
        if kind == "float_list":
          items = [field(1, 5, v.astype("<f4").tobytes()) for v in run]
          body += field(1, 2, run.astype("<f4").tobytes()) if packed else b"".join(items)
        else:
          items = [field(1, 0, varint(int(v))) for v in run]
          body += (field(1, 2, b"".join(varint(int(v)) for v in run)) if packed
                   else b"".join(items))
      body = field(KINDS[kind], 2, body)
    entries += field(1, 2, field(1, 2, name.encode()) + field(2, 2, body)) + unknown()
  return unknown() + field(1, 2, entries)


def reference(data: bytes) -> dict:
  """protobuf's parse of ``data`` in parse_example's format."""
  out = {}
  for name, feature in tf_example_pb2.Example.FromString(data).features.feature.items():
    kind = feature.WhichOneof("kind")
    if kind is None:
      out[name] = None
    elif kind == "bytes_list":
      out[name] = list(feature.bytes_list.value)
    else:
      dtype = np.float32 if kind == "float_list" else np.int64
      out[name] = np.array(getattr(feature, kind).value, dtype)
  return out


def assert_same(ours: dict, theirs: dict) -> None:
  assert ours.keys() == theirs.keys()
  for name, expected in theirs.items():
    got = ours[name]
    if expected is None or isinstance(expected, list):
      assert got == expected, name
    else:
      assert got.dtype == expected.dtype and got.shape == expected.shape, name
      # Bit patterns: -0.0, NaN and subnormals must survive exactly.
      np.testing.assert_array_equal(got.view(f"u{got.itemsize}"),
                                    expected.view(f"u{expected.itemsize}"), err_msg=name)


@pytest.mark.parametrize("seed", range(40))
def test_matches_protobuf_on_random_examples(seed):
  rng = np.random.default_rng(seed)
  features = random_features(rng)
  for data in (to_proto(features).SerializeToString(), encode_by_hand(features, rng)):
    assert_same(example_proto.parse_example(data), reference(data))


def test_repeated_map_keys_and_oneof_merges_match_protobuf():
  """A key given twice: the last entry wins; within one entry, the same list kind appends
  and another kind replaces (protobuf's merge)."""
  floats = lambda *v: field(2, 2, field(1, 2, np.array(v, "<f4").tobytes()))
  ints = lambda *v: field(3, 2, b"".join(field(1, 0, varint(x)) for x in v))
  entry = lambda name, *values: field(1, 2, field(1, 2, name) + b"".join(
      field(2, 2, v) for v in values))
  data = field(1, 2, entry(b"a", floats(1.0)) + entry(b"a", ints(-5), ints(7))
               + entry(b"b", floats(1, 2), floats(3)) + entry(b"c", ints(1), floats(2.5))
               + entry(b"d"))
  data += field(1, 2, entry(b"e", field(1, 2, field(1, 2, b"later"))))  # a 2nd Features merges
  assert_same(example_proto.parse_example(data), reference(data))


def test_truncated_or_malformed_input_raises_like_protobuf():
  rng = np.random.default_rng(0)
  data = to_proto({"image": ("bytes_list", [b"\x89PNG" * 50]), "labels": (
      "float_list", np.ones(14, np.float32)), "ids": ("int64_list", np.array([-3, 2**40]))}
                  ).SerializeToString()
  for cut in sorted(set(rng.integers(1, len(data), 30).tolist()) | {1, len(data) - 1}):
    with pytest.raises(message.DecodeError):
      tf_example_pb2.Example.FromString(data[:cut])
    with pytest.raises(example_proto.DecodeError):
      example_proto.parse_example(data[:cut])
  feature = field(2, 2, field(1, 2, b"abc"))   # a packed FloatList of 3 bytes
  bad_wire = field(1, 2, field(1, 2, field(1, 2, b"x") + field(2, 2, feature)))
  with pytest.raises(example_proto.DecodeError, match="not a multiple of 4"):
    example_proto.parse_example(bad_wire)
  with pytest.raises(example_proto.DecodeError, match="wire type 3"):
    example_proto.parse_example(varint(1 << 3 | 3))


def test_decode_features_shapes_like_tfds():
  """Tensor: dtype + reshape (-1 = any length, () a scalar); Text / Image: the one bytes value."""
  fields = {"boxes": example_proto.Field("tensor", "float32", (-1, 4)),
            "box_labels": example_proto.Field("tensor", "int32", (-1,)),
            "count": example_proto.Field("tensor", "int64", ()),
            "image_id": example_proto.Field("text", "bytes", ())}
  parsed = {"boxes": np.arange(8, dtype=np.float32), "box_labels": np.array([3, -1]),
            "count": np.array([7]), "image_id": [b"a.png"], "ignored": [b""]}
  out = example_proto.decode_features(parsed, fields)
  assert out.keys() == fields.keys()
  np.testing.assert_array_equal(out["boxes"], np.arange(8).reshape(2, 4))
  assert out["boxes"].dtype == np.float32 and out["box_labels"].dtype == np.int32
  assert out["count"] == 7 and isinstance(out["count"], int) and out["image_id"] == b"a.png"
  for broken, message in [({**parsed, "boxes": np.ones(6, np.float32)}, "6 values"),
                          ({**parsed, "box_labels": np.array([2**40])}, "overflow int32"),
                          ({**parsed, "image_id": [b"a", b"b"]}, "2 bytes values"),
                          ({k: v for k, v in parsed.items() if k != "count"},
                           "'count' is missing")]:
    with pytest.raises(example_proto.DecodeError, match=message):
      example_proto.decode_features(broken, fields)
