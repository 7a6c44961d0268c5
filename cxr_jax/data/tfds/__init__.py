"""TFDS builders of the real datasets (``builders``); importing this registers them."""

from cxr_jax.data.tfds.builders import BUILDERS, CxrBuilder, CxrConfig  # noqa: F401
