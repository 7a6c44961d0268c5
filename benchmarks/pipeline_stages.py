"""CPU cost per image of each stage of the prepared-shard input pipeline, in one process.

    python benchmarks/pipeline_stages.py --data_dir=DIR [--dataset=nih] [--size=256]
        [--images=300] [--cv2_threads=1]

DIR is ``cxr-prepare`` output. Prints ms of wall and CPU time per image for: the stored
record read + tf.Example parse, the PNG decode, the whole read (``PreparedSource`` plus the
pipeline's validation) and the training augmentation + record of ``examples.Preprocess``.
One grain worker runs these in turn, so 1 / (read + preprocess) bounds what one worker
delivers; ``cxr-bench``'s ``pipeline`` figures measure the workers together.
"""

import argparse
import os
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cxr_jax.bench import configs  # noqa: E402
from cxr_jax.data import examples as examples_lib, pipeline, schema  # noqa: E402


def per_image(name: str, fn, n: int):
  """Runs fn(i) for i < n; prints and returns its outputs."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = [fn(i) for i in range(n)]
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  print(f"{name:34s} wall {1e3 * wall / n:7.3f} ms/img   CPU {1e3 * cpu / n:7.3f} ms/img")
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--dataset", default="nih")
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--images", type=int, default=300)
  parser.add_argument("--cv2_threads", type=int, default=1, help="-1: OpenCV's default")
  args = parser.parse_args()
  if args.cv2_threads >= 0:
    cv2.setNumThreads(args.cv2_threads)
  config = configs.load_config(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "baseline", f"dataset={args.dataset},size={args.size}",
                               {"data.data_dir": args.data_dir})
  source = pipeline.make_source(config.data, "train")
  n = min(args.images, len(source))
  stored = source.source.stored
  print(f"{source!r}: {n} images, OpenCV threads {cv2.getNumThreads()}")
  raw = per_image("record read + tf.Example parse", lambda i: stored[int(source.indices[i])], n)
  per_image("PNG decode", lambda i: cv2.imdecode(np.frombuffer(raw[i]["image"], np.uint8),
                                                 cv2.IMREAD_GRAYSCALE), n)
  classes = len(schema.get_label_space(config.data.label_space))
  checked = examples_lib.CheckedSource(source, 0, len(source), classes, False)
  examples = per_image("whole read (+ assemble, validate)", lambda i: checked[i], n)
  preprocess = examples_lib.Preprocess(config.data, (), config.data.augment, (),
                                       examples_lib.padding_record(config.data, ()))
  rng = np.random.default_rng(0)
  per_image("augmentation + record", lambda i: preprocess.random_map(examples[i], rng), n)


if __name__ == "__main__":
  main()
