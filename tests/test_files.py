"""cxr_jax.files: whole files with mode 0644, nothing left behind by a failed write."""

import json
import os
import stat

import numpy as np
import pytest

from cxr_jax import files


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def _temps(folder) -> list[str]:
  return [n for n in os.listdir(folder) if files.is_temp_name(n)]


def test_writers_make_whole_files_with_mode_0644(tmp_path):
  target = tmp_path / "a" / "b" / "out.bin"          # folders are created
  files.write_bytes_atomic(str(target), b"x" * 100_000)
  assert target.read_bytes() == b"x" * 100_000
  files.write_text_atomic(str(tmp_path / "t.md"), "| a |\n")
  files.write_json_atomic(str(tmp_path / "j.json"), {"k": [1, 2]}, indent=None)
  files.write_npz_atomic(str(tmp_path / "w.npz"), a=np.arange(3))
  with files.atomic_open(str(tmp_path / "s.csv"), "w", newline="") as f:
    f.write("x,y\n")
  with files.atomic_path(str(tmp_path / "p.bin")) as tmp:
    with open(tmp, "wb") as f:
      f.write(b"by path")
  assert (tmp_path / "t.md").read_text() == "| a |\n"
  assert (tmp_path / "j.json").read_text() == '{"k": [1, 2]}'
  np.testing.assert_array_equal(np.load(tmp_path / "w.npz")["a"], np.arange(3))
  assert (tmp_path / "s.csv").read_text() == "x,y\n"
  assert (tmp_path / "p.bin").read_bytes() == b"by path"
  for path in (target, *(tmp_path / n for n in ("t.md", "j.json", "w.npz", "s.csv", "p.bin"))):
    assert _mode(path) == 0o644, path
  assert not _temps(tmp_path) and not _temps(target.parent)


def test_exception_inside_atomic_open_leaves_the_old_file_and_no_temp(tmp_path):
  path = tmp_path / "shard.bin"
  path.write_bytes(b"old")
  with pytest.raises(RuntimeError, match="killed"):
    with files.atomic_open(str(path), "wb") as f:
      f.write(b"new, half written")
      assert _temps(tmp_path)                          # the part is under a temp name
      raise RuntimeError("killed")
  assert path.read_bytes() == b"old"
  assert sorted(os.listdir(tmp_path)) == ["shard.bin"]
  with pytest.raises(KeyboardInterrupt):
    with files.atomic_path(str(tmp_path / "new.bin")):
      raise KeyboardInterrupt
  assert sorted(os.listdir(tmp_path)) == ["shard.bin"]
  with pytest.raises(ValueError, match="write mode"):   # appending cannot be made atomic
    with files.atomic_open(str(path), "ab") as f:
      f.write(b"appended")
  assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["shard.bin"]


def test_json_that_does_not_serialize_leaves_the_old_file(tmp_path):
  path = tmp_path / "m.json"
  files.write_json_atomic(str(path), {"auc": 0.5})
  with pytest.raises(ValueError):
    files.write_json_atomic(str(path), {"auc": float("nan")})
  assert json.loads(path.read_text()) == {"auc": 0.5}
  assert sorted(os.listdir(tmp_path)) == ["m.json"]


def test_update_json_atomic_keeps_other_keys(tmp_path):
  path = str(tmp_path / "summary.json")
  assert files.update_json_atomic(path, {"a": 1, "b": {"x": 1}}) == {"a": 1, "b": {"x": 1}}
  assert files.update_json_atomic(path, {"b": 2, "c": 3}) == {"a": 1, "b": 2, "c": 3}
  with open(path) as f:
    assert json.load(f) == {"a": 1, "b": 2, "c": 3}
  assert _mode(path) == 0o644
