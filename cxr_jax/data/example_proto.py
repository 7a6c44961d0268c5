"""Serialized tf.train.Example -> numpy as TFDS decodes it, in pure Python (no TF, no protobuf).

The prepared shards hold one Example per record, written by TFDS'
``FeaturesDict.serialize_example``. ``parse_example`` reads the protobuf wire
format; ``read_features`` reads the folder's ``features.json`` (the
FeaturesDict) and ``decode_features`` shapes the parsed values as TFDS'
``as_data_source(..., decoders={'image': tfds.decode.SkipDecoding()})``
returns them (``tensorflow_datasets.core.example_parser.ExampleParserNp``):
Tensor -> ``np.array(values, dtype).reshape(shape)`` (None -> -1; shape ()
-> a Python scalar), Text -> bytes, Image -> its encoded bytes.

The messages, from
tensorflow/core/example/{example,feature}.proto::

  Example   { Features features = 1; }
  Features  { map<string, Feature> feature = 1; }    # entries: {key = 1; value = 2}
  Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                           Int64List int64_list = 3; } }
  BytesList { repeated bytes value = 1; }
  FloatList { repeated float value = 1 [packed = true]; }
  Int64List { repeated int64 value = 1 [packed = true]; }

Wire format (protobuf encoding): each field is a varint key
``number << 3 | wire_type`` then its value: wire type 0 a varint, 1 eight
bytes, 2 a varint length then that many bytes (messages, bytes, packed
repeated scalars), 5 four bytes. Floats are little-endian IEEE float32, int64
a two's complement varint (10 bytes when negative). Packed and unpacked
repeated scalars are both accepted, and mixed, as protobuf parsers must;
unknown fields are skipped; a field of a message given twice is merged (map
keys: the last wins; the same list kind: values appended; another kind of
the oneof: replaces).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

BYTES_LIST, FLOAT_LIST, INT64_LIST = 1, 2, 3
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_INT64_WRAP = 1 << 64
_UINT64_MASK = _INT64_WRAP - 1
_INT64_SIGN = 1 << 63


class DecodeError(ValueError):
  """A malformed serialized Example; the message names the byte offset."""


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
  """The unsigned varint at ``buf[pos:end]`` -> (value, position after it)."""
  value = shift = 0
  start = pos
  while True:
    if pos >= end:
      raise DecodeError(f"varint at byte {start} runs past the end of its message (byte {end})")
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value & _UINT64_MASK, pos   # bits past 64 are dropped, as protobuf does
    shift += 7
    if shift >= 70:
      raise DecodeError(f"varint at byte {start} is longer than 10 bytes")


def _fields(buf: bytes, start: int, end: int):
  """Yields (field number, wire type, value, byte offset of its key) of message ``buf[start:end]``.

  The value is the integer of a varint, else the (start, stop) byte range of
  the field's payload in ``buf``.
  """
  pos = start
  while pos < end:
    at = pos
    key, pos = _varint(buf, pos, end)
    number, wire = key >> 3, key & 7
    if number == 0:
      raise DecodeError(f"field number 0 at byte {at}")
    if wire == _VARINT:
      value, pos = _varint(buf, pos, end)
      yield number, wire, value, at
      continue
    if wire == _LENGTH:
      size, pos = _varint(buf, pos, end)
    elif wire in (_FIXED64, _FIXED32):
      size = 8 if wire == _FIXED64 else 4
    else:
      raise DecodeError(f"field {number} at byte {at} has wire type {wire} (groups or invalid)")
    if pos + size > end:
      raise DecodeError(f"field {number} at byte {at} holds {size} bytes, only {end - pos} "
                        f"remain in its message (truncated?)")
    yield number, wire, (pos, pos + size), at
    pos += size


def _check_wire(wire: int, allowed: tuple[int, ...], what: str, at: int) -> None:
  if wire not in allowed:
    raise DecodeError(f"{what} at byte {at} has wire type {wire}, expected one of {allowed}")


def _bytes_values(buf: bytes, start: int, end: int) -> list[bytes]:
  values = []
  for number, wire, span, at in _fields(buf, start, end):
    if number == 1:
      _check_wire(wire, (_LENGTH,), "BytesList.value", at)
      values.append(buf[span[0]:span[1]])
  return values


def _float_values(buf: bytes, start: int, end: int) -> list[np.ndarray]:
  """FloatList -> float32 chunks (views of ``buf``): packed runs or single unpacked values."""
  chunks = []
  for number, wire, span, at in _fields(buf, start, end):
    if number != 1:
      continue
    _check_wire(wire, (_LENGTH, _FIXED32), "FloatList.value", at)
    pos, stop = span
    if (stop - pos) % 4:
      raise DecodeError(f"packed FloatList.value at byte {at} holds {stop - pos} bytes, not a "
                        f"multiple of 4")
    chunks.append(np.frombuffer(buf, "<f4", (stop - pos) // 4, pos))
  return chunks


def _int64_values(buf: bytes, start: int, end: int) -> list[int]:
  """Int64List -> Python ints: packed runs of varints or single unpacked varints."""
  values = []
  for number, wire, value, at in _fields(buf, start, end):
    if number != 1:
      continue
    _check_wire(wire, (_LENGTH, _VARINT), "Int64List.value", at)
    if wire == _VARINT:
      values.append(value)
      continue
    pos, stop = value
    while pos < stop:
      item, pos = _varint(buf, pos, stop)
      values.append(item)
  return [v - _INT64_WRAP if v >= _INT64_SIGN else v for v in values]


_LIST_PARSERS = {BYTES_LIST: _bytes_values, FLOAT_LIST: _float_values, INT64_LIST: _int64_values}


def _merge_feature(buf: bytes, start: int, end: int, kind: int | None, values: list | None):
  """Merges the Feature message ``buf[start:end]`` into (kind, values) -> (kind, values)."""
  for number, wire, span, at in _fields(buf, start, end):
    if number in _LIST_PARSERS:
      _check_wire(wire, (_LENGTH,), "Feature.kind", at)
      parsed = _LIST_PARSERS[number](buf, *span)
      values = values + parsed if kind == number else parsed
      kind = number
  return kind, values


def _as_array(kind: int | None, values: list | None):
  if kind == FLOAT_LIST:
    return np.concatenate(values).astype(np.float32) if values else np.zeros(0, np.float32)
  if kind == INT64_LIST:
    return np.array(values, np.int64)
  return values


def parse_example(data: bytes) -> dict[str, list[bytes] | np.ndarray | None]:
  """A serialized tf.train.Example -> {feature name: its values}.

  Values: bytes_list -> list of bytes (each one slice of ``data``);
  float_list -> float32 [N]; int64_list -> int64 [N]; a Feature with no list
  set -> None. Raises ``DecodeError`` (a ValueError) on malformed input.
  """
  buf = data if isinstance(data, bytes) else bytes(data)
  features: dict[str, tuple] = {}
  for number, wire, span, at in _fields(buf, 0, len(buf)):
    if number != 1:
      continue
    _check_wire(wire, (_LENGTH,), "Example.features", at)
    for entry_number, entry_wire, entry, entry_at in _fields(buf, *span):
      if entry_number != 1:
        continue
      _check_wire(entry_wire, (_LENGTH,), "Features.feature", entry_at)
      key, feature = b"", (None, None)   # a map entry replaces an earlier one of its key
      for field, field_wire, field_span, field_at in _fields(buf, *entry):
        if field == 1:
          _check_wire(field_wire, (_LENGTH,), "Features.feature key", field_at)
          key = buf[field_span[0]:field_span[1]]
        elif field == 2:
          _check_wire(field_wire, (_LENGTH,), "Features.feature value", field_at)
          feature = _merge_feature(buf, *field_span, *feature)
      try:
        features[key.decode()] = feature
      except UnicodeDecodeError:
        raise DecodeError(f"feature name {key[:40]!r} at byte {entry_at} is not UTF-8") from None
  return {name: _as_array(kind, values) for name, (kind, values) in features.items()}


@dataclasses.dataclass(frozen=True)
class Field:
  """One stored feature: kind 'tensor' (a ``dtype`` array of ``shape``, -1 = any
  length), 'text' (bytes) or 'image' (its encoded bytes; ``dtype`` / ``shape``
  of the decoded image)."""
  kind: str
  dtype: str
  shape: tuple[int, ...]


_CLASSES = {"tensor_feature.Tensor": "tensor", "text_feature.Text": "text",
            "image_feature.Image": "image"}


def read_features(path: str) -> dict[str, Field]:
  """TFDS' ``features.json`` of a flat FeaturesDict of Tensor / Text / Image -> {name: Field}.

  Raises ValueError naming the file and feature for anything else (nested
  dicts, other feature classes, encoded tensors).
  """
  with open(path) as f:
    try:
      features = json.load(f)["featuresDict"]["features"]
    except (KeyError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: not a TFDS features.json of a FeaturesDict ({e!r})") from None
  fields = {}
  for name, spec in features.items():
    kind = _CLASSES.get(spec.get("pythonClassName", "").rpartition("features.")[2])
    if kind is None:
      raise ValueError(f"{path}: feature {name!r} is a {spec.get('pythonClassName')!r}; "
                       f"readable: {sorted(_CLASSES)}")
    body = spec.get(kind, {})
    if kind == "tensor" and body.get("encoding", "none") != "none":
      raise ValueError(f"{path}: feature {name!r} has encoding {body['encoding']!r}")
    shape = tuple(int(d) for d in body.get("shape", {}).get("dimensions", ()))
    fields[name] = Field(kind, body.get("dtype", "bytes" if kind == "text" else "uint8"), shape)
  return fields


def decode_features(parsed: dict, fields: dict[str, Field]) -> dict:
  """``parse_example``'s values -> {name: value} for the features in ``fields``.

  Tensor: ``dtype`` array reshaped to ``shape`` (a Python scalar when shape
  is ()); Text and Image: the one bytes value. Raises ``DecodeError`` naming
  the feature when it is missing or its values do not fit.
  """
  out = {}
  for name, field in fields.items():
    values = parsed.get(name)
    if values is None:
      state = "is missing" if name not in parsed else "holds no value list"
      raise DecodeError(f"feature {name!r} {state}")
    if field.kind != "tensor":
      if not isinstance(values, list) or len(values) != 1:
        raise DecodeError(f"feature {name!r} ({field.kind}) holds {_describe(values)}, "
                          f"expected one bytes value")
      out[name] = values[0]
      continue
    if isinstance(values, list):
      raise DecodeError(f"feature {name!r} (tensor {field.dtype}) holds {_describe(values)}")
    array = values.astype(field.dtype)
    if array.dtype.kind in "iu" and not np.array_equal(array, values):
      raise DecodeError(f"feature {name!r}: values {values} overflow {field.dtype}")
    try:
      array = array.reshape(field.shape)
    except ValueError:
      raise DecodeError(f"feature {name!r}: {array.size} values do not fit shape "
                        f"{field.shape}") from None
    out[name] = array if field.shape else array.item()
  return out


def _describe(values) -> str:
  if isinstance(values, list):
    return f"{len(values)} bytes values"
  return f"{values.size} {'float' if values.dtype == np.float32 else 'int64'} values"
