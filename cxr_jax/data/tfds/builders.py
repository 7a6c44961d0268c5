"""TFDS builders of the real datasets (ArrayRecord), for users who prefer ``tfds build``.

  tfds build --imports=cxr_jax.data.tfds --datasets=cxr_nih/256 \\
      --manual_dir=/data/nih --data_dir=/data/prepared --file_format=array_record

They write the features of ``shards.features`` (the same as ``cxr-prepare``)
into DATA_DIR/cxr_<dataset>/<config>/1.0.0, so ``data.data_dir=DATA_DIR``
reads either. ``cxr-prepare`` is the faster route (parallel over cores,
resumable, writes the split index ``cxr_index.json``; without it the index is
rebuilt by reading every example once at startup). Configs: one per stored
image size (224, 256, 512) with the default reader options (U-zeros, frontal
views); ``CxrConfig`` builds others, named like ``layout.config_name``.
REFLACX and EGD-CXR take the MIMIC-CXR-JPG folder as ``mimic_dir=``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import ClassVar

from etils import epath
import tensorflow_datasets as tfds

from cxr_jax.data import layout, schema, shards

IMAGE_SIZES = (224, 256, 512)


@dataclasses.dataclass(kw_only=True)
class CxrConfig(tfds.core.BuilderConfig):
  """Stored image size and reader options; ``name`` = layout.config_name(...)."""
  image_size: int = 256
  uncertainty: str = "zeros"
  frontal_only: bool = True

  @classmethod
  def make(cls, image_size: int, uncertainty: str = "zeros", frontal_only: bool = True
           ) -> CxrConfig:
    return cls(name=layout.config_name(image_size, uncertainty, frontal_only),
               description=f"{image_size}px gray PNG, {uncertainty} uncertainty, "
                           f"{'frontal views' if frontal_only else 'all views'}",
               image_size=image_size, uncertainty=uncertainty, frontal_only=frontal_only)


class CxrBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Reads ``manual_dir`` with ``cxr_jax.data.sources.<DATASET>`` and stores resized images."""

  DATASET: ClassVar[str]
  HOMEPAGE: ClassVar[str]
  VERSION = tfds.core.Version(layout.VERSION)
  RELEASE_NOTES = {layout.VERSION: "Official splits, images resized once, PNG in ArrayRecord."}
  BUILDER_CONFIGS = [CxrConfig.make(size) for size in IMAGE_SIZES]
  DEFAULT_CONFIG_NAME = "256"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9.10's own code_path imports the Python < 3.9 backport
    # importlib_resources, which its requirements do not install on 3.11.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, mimic_dir: str = "", file_format=None, **kwargs):
    self.mimic_dir = mimic_dir
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _label_space(self) -> schema.LabelSpace:
    space = layout.reader_module(self.DATASET).LABEL_SPACE
    return schema.get_label_space(space) if isinstance(space, str) else space

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return self.dataset_info_from_configs(
        description=f"{self.DATASET} chest X-rays for cxr_jax ({config.description}).",
        features=shards.features(len(self._label_space()), config.image_size),
        homepage=self.HOMEPAGE)

  def _split_generators(self, dl_manager):
    config = self.builder_config
    kwargs = dict(mimic_dir=self.mimic_dir) if self.DATASET in ("reflacx", "egd") else {}
    records, _ = layout.reader_module(self.DATASET).read(
        str(dl_manager.manual_dir), uncertainty=config.uncertainty,
        frontal_only=config.frontal_only, **kwargs)
    by_split = {}
    for record in records:
      by_split.setdefault(layout.stored_split(record), []).append(record)
    return {split: self._generate_examples(recs) for split, recs in by_split.items()}

  def _generate_examples(self, records):
    size = self.builder_config.image_size
    for record in records:
      yield record.id, shards.encode_record(record, size)


class CxrNih(CxrBuilder):
  DATASET = "nih"
  HOMEPAGE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download NIH ChestX-ray14 (https://nihcc.app.box.com/v/ChestXray-NIHCC or
  Kaggle "nih-chest-xrays/data") into manual_dir: Data_Entry_2017_v2020.csv
  (or Data_Entry_2017.csv), BBox_List_2017.csv, train_val_list.txt,
  test_list.txt and the images in images/ or images_001/images/ ...
  images_012/images/.
  """


class CxrChexpert(CxrBuilder):
  DATASET = "chexpert"
  HOMEPAGE = "https://stanfordmlgroup.github.io/competitions/chexpert/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Register and download CheXpert-v1.0 (or CheXpert-v1.0-small) from
  https://stanfordmlgroup.github.io/competitions/chexpert/; manual_dir is the
  folder holding train.csv, valid.csv, train/ and valid/ (or its parent).
  """


class CxrMimic(CxrBuilder):
  DATASET = "mimic"
  HOMEPAGE = "https://physionet.org/content/mimic-cxr-jpg/2.0.0/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Credentialed PhysioNet access: download MIMIC-CXR-JPG 2.0.0
  (https://physionet.org/content/mimic-cxr-jpg/2.0.0/) into manual_dir:
  files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg and the tables
  mimic-cxr-2.0.0-{metadata,chexpert,split}.csv(.gz).
  """


class CxrReflacx(CxrBuilder):
  DATASET = "reflacx"
  HOMEPAGE = "https://physionet.org/content/reflacx-xray-localization/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download REFLACX (https://physionet.org/content/reflacx-xray-localization/)
  into manual_dir (main_data/metadata_phase_{1,2,3}.csv and main_data/<id>/),
  and MIMIC-CXR-JPG 2.0.0 (its images) elsewhere; pass its folder as
  builder kwarg mimic_dir (tfds build ... --builder_kwargs or
  tfds.builder('cxr_reflacx', mimic_dir=...)).
  """


class CxrEgd(CxrBuilder):
  DATASET = "egd"
  HOMEPAGE = "https://physionet.org/content/egd-cxr/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download EGD-CXR (https://physionet.org/content/egd-cxr/) into manual_dir
  (master_sheet.csv, fixations.csv, bounding_boxes.csv) and MIMIC-CXR-JPG
  2.0.0 (its images) elsewhere; pass its folder as builder kwarg mimic_dir.
  """


BUILDERS = {cls.DATASET: cls for cls in (CxrNih, CxrChexpert, CxrMimic, CxrReflacx, CxrEgd)}
