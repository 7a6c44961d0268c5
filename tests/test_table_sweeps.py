"""Every table of cxr_jax/evaluation/paper_tables.json is a sweep of its method's config:
``get_sweep('table=N')`` gives the rows the library runs, exactly as printed, each with its
replicates; each row's overrides apply to the config and the method's stages build."""

import fnmatch
import importlib
import pathlib

import pytest

from cxr_jax.cli import sweep
from cxr_jax.evaluation import paper_table
from cxr_jax.methods import get_method
from cxr_jax.models.bilinear import OneStream, TwoStreamBilinear

REPO = pathlib.Path(__file__).resolve().parents[1]
SPEC = paper_table.load_spec()
# paper -> (config module, arg keys besides table=): the XRV rows exist only with xrv=PATH
# (converted torchxrayvision weights; a path string is enough to build the stages).
CONFIGS = {"ge2018": ("msml", ""), "vansonsbeek2023": ("vkd", ""),
           "rozenberg2020": ("patch_loc", ""), "kim2022": ("disease_masks", ""),
           "talasila2023": ("byol_cam", ",xrv=/nonexistent/xrv.npz")}
# The replicates of a row on the phantoms: (key, count); Rozenberg's protocol is 5-fold CV.
REPLICATES = {"rozenberg2020": ("data.cv.fold", 5)}
TABLES = [(paper, table) for paper in SPEC for table in SPEC[paper]["tables"]]


def runnable_rows(paper: str, table: str) -> list[str]:
  """The rows the library runs: all but the prior work the paper cites."""
  return [r["name"] for r in SPEC[paper]["tables"][table]["rows"]
          if not r.get("note", "").startswith("prior work")]


def config_module(paper: str):
  return importlib.import_module(f"configs.{CONFIGS[paper][0]}")


def row_names(rows) -> list[str]:
  return list(dict.fromkeys(r["table.row"] for r in rows))


def check_row(paper: str, name: str, config, method) -> None:
  """What the row's name says, checked on its config and built stages."""
  stages = [s.name for s in method.stages(config)]
  if paper == "ge2018":
    model = method.model(config)
    single = {"R18": False, "D121": False, "R18-BL": True, "D121-BL": True}
    if name in single:
      assert isinstance(model, OneStream) and model.self_bilinear == single[name]
    elif name.startswith(("R18 + D121", "R18 + VGG", "D121 + VGG")):   # the first member
      assert isinstance(model, OneStream) and not model.self_bilinear
    else:
      assert isinstance(model, TwoStreamBilinear)
      assert config.msml.stream2_loss == ("bce" if name.endswith("-BL") else "msml")
    backbone = "densenet121" if name.startswith("D121") else "resnet18"
    assert config.model.backbone == backbone
    assert stages == (["streams", "bilinear"] if name.startswith("Local") else ["train"])
    assert config.msml.strategy == {"Local": "local", "Local-Fixed": "local_fixed"}.get(
        name, "global")
  elif paper == "vansonsbeek2023":
    base = "Base model" in name or "/ none /" in name
    assert stages == (["base"] if base else ["base", "prior"])
    assert (config.evals.cam_shift.when == "never") == base
    parts = name.split(" / ")   # 'backbone / annotation' or 'source / setting / backbone'
    assert config.model.backbone == (parts[0] if len(parts) == 2 else parts[-1]).lower()
    if "released" in name:
      release = {"CH1": "ch1_prior", "CH1 + CH2": "ch1_ch2_prior",
                 "Encoder + CH1 + CH2": "all", "CH2": "ch2_prior"}
      assert config.vkd.release == release[name.split(" / ")[1].removesuffix(" released")]
    elif not base:
      gaze, boxes = "Gaze" in name or "gaze" in name, "BB" in name or "Bounding" in name
      assert config.vkd.annotation == "+".join(k for k, on in (("gaze", gaze), ("boxes", boxes))
                                               if on)
  elif paper == "rozenberg2020":
    percent, model = name.split(" / ")
    assert config.data.cv.unannotated_fraction == float(percent.rstrip("%")) / 100
    assert config.data.cv.num_folds == 5
    assert config.patch_loc.loss == ("li" if model == "ref." else "rozenberg")
    assert ("crf" in stages) == (model == "ours")
  elif paper == "kim2022":
    aligned = name != "ResNet-50"
    assert ("align" in stages) == aligned == config.dm.align
    masks = "pdm" if "PDM" in name else "dm" if name.endswith("DM") or name == "Ours" else "none"
    assert config.dm.masks == masks
  else:
    assert ("pretrain" in stages) == name.startswith("SSL")
    assert (config.byol.cam_weight > 0) == ("CAM" in name and name.startswith("SSL"))
    assert (config.byol.finetune.cam_weight > 0) == (name == "XRV + CAM Loss")
    assert config.model.init_from == ("/nonexistent/xrv.npz" if name.startswith("XRV") else "")


@pytest.mark.parametrize("paper,table", TABLES, ids=[f"{p}:{t}" for p, t in TABLES])
def test_table_sweep_runs_the_papers_rows(paper, table):
  module = config_module(paper)
  arg = f"table={table}{CONFIGS[paper][1]}"
  rows = module.get_sweep(arg)
  assert row_names(rows) == runnable_rows(paper, table)
  key, count = REPLICATES.get(paper, ("seed", 3))
  for name in row_names(rows):
    assert sorted(r[key] for r in rows if r["table.row"] == name) == list(range(count))
  base = module.get_config(arg)
  method = get_method(SPEC[paper]["method"])
  assert base.method == method.name
  checked = set()
  for index, row in enumerate(rows):
    config = sweep.apply_overrides(base, row, f"row {index}")
    assert (config.table.paper, config.table.table, config.table.row) == (
        paper, table, row["table.row"])
    if row["table.row"] not in checked:   # replicates differ only in their key
      checked.add(row["table.row"])
      check_row(paper, row["table.row"], config, method)


@pytest.mark.parametrize("paper", sorted(CONFIGS))
def test_unknown_table_is_an_error_listing_the_known_ones(paper):
  module = config_module(paper)
  known = list(SPEC[paper]["tables"])
  with pytest.raises(KeyError, match="known: " + str(known).replace("[", r"\[")):
    module.get_sweep("table=99")
  with pytest.raises(KeyError, match="table='99'"):
    module.get_config("table=99")


def test_seeds_and_folds_set_the_replicates():
  """seeds=K; the cross-validated protocols replicate over their folds instead."""
  from configs import byol_cam, disease_masks, msml, patch_loc, vkd
  assert [r["seed"] for r in msml.get_sweep("table=2,seeds=2")] == [0, 0, 0, 1, 1, 1]
  assert {r["data.cv.fold"] for r in patch_loc.get_sweep("table=1,folds=3")} == {0, 1, 2}
  assert all(r["data.cv.num_folds"] == 3 for r in patch_loc.get_sweep("table=1,folds=3"))
  with pytest.raises(ValueError, match="folds >= 2"):
    patch_loc.get_config("table=1,folds=1")
  nih = vkd.get_sweep("table=1-nih,dataset=nih")
  assert len(nih) == 6 * 5 and {r["data.cv.fold"] for r in nih} == set(range(5))
  assert "seed" not in nih[0]
  tal = byol_cam.get_sweep("table=III,dataset=nih")
  assert row_names(tal) == ["Baseline", "SSL + FT", "SSL + CAM Loss + FT (ours)"]   # no xrv=
  assert sorted(r["byol.pretrain_cv.fold"] for r in tal) == sorted(list(range(5)) * 3)
  assert len(disease_masks.get_sweep("table=3,seeds=1")) == 1


def test_vkd_real_data_tables():
  """MIMIC-CXR rows train stage 2 on their prepared subset; each table names its datasets."""
  from configs import vkd
  from cxr_jax.methods.vkd import VKD
  arg = "table=1-mimic,dataset=mimic,subset=reflacx"
  rows = vkd.get_sweep(arg)
  assert row_names(rows) == runnable_rows("vansonsbeek2023", "1-mimic")
  subsets = {r["table.row"].split(" / ")[1]: r.get("vkd.stage2.dataset") for r in rows}
  assert subsets == {"Base model": None, "+BB - REFLACX": "reflacx",
                     "+Gaze - REFLACX": "reflacx", "+Gaze - EGD-CXR": "egd",
                     "+Gaze - EGD-CXR & BB - REFLACX": "egd:gaze+reflacx:boxes",
                     "+Gaze - EGD-CXR & Gaze - REFLACX": "egd+reflacx"}
  base = vkd.get_config(arg)
  for row in rows[:6]:
    VKD().stages(sweep.apply_overrides(base, row, row["table.row"]))
  t4 = vkd.get_sweep("table=4,dataset=nih")
  assert {r["table.row"].split(" / ")[0] for r in t4} == {"Chest X-ray14"}
  with pytest.raises(ValueError, match="table=3 runs on dataset= one of"):
    vkd.get_config("table=3,dataset=nih")
  with pytest.raises(ValueError, match="table=1-mimic runs on dataset= one of"):
    vkd.get_config("table=1-mimic,dataset=nih")


def test_ge_ensemble_commands_find_their_members():
  """The docstring's cxr-eval loop (configs/msml.py) matches one workdir per glob: the row's
  run (its first member) and the second member of the same seed."""
  spec = str(REPO / "configs" / "msml.py")
  rows = {r["name"]: r for r in sweep.plan(spec + ":table=1-ensembles", "/r")}
  members = {r["name"]: r for r in sweep.plan(spec + ":table=1-ensembles,members", "/m")}
  assert len(rows) == 9 and len(members) == 6
  for seed in range(3):
    for pair, backbone in (("R18_+_D121", "densenet121"), ("R18_+_VGG-F-MSML", "vgg16"),
                           ("D121_+_VGG-F-MSML", "vgg16")):
      (row,) = fnmatch.filter(rows, f"*-row={pair},seed={seed},*")
      (member,) = fnmatch.filter(members, f"*-seed={seed},backbone={backbone},*")
      assert rows[row]["config"].table.row == pair.replace("_", " ")
      assert rows[row]["config"].seed == members[member]["config"].seed == seed
      config = members[member]["config"]
      assert config.table.paper == "" and config.model.backbone == backbone
      assert config.msml.streams == ("two" if backbone == "vgg16" else "one")
  with pytest.raises(ValueError, match="members"):
    importlib.import_module("configs.msml").get_config("table=1,members")
