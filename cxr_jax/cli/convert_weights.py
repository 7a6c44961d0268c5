"""cxr-convert-weights: a torchvision / torchxrayvision weights file -> our backbone variables (.npz).

  cxr-convert-weights --arch=resnet50 --input=resnet50-0676ba61.pth --output=resnet50.npz
  cxr-convert-weights --arch=densenet121 --input=densenet121.pth --output=d121_grey.npz --in_channels=1
  cxr-convert-weights --arch=xrv_densenet121 --input=xrv_state_dict.pth --output=xrv.npz

Reads a local file (nothing is downloaded): '.pth' / '.pt' needs torch (the
'parity' extra); '.safetensors' and '.npz' do not. Writes the output
atomically; train from it with ``--config.model.init_from=OUTPUT``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from flax import traverse_util

from cxr_jax.models import pretrained

ARCHS = pretrained.TORCHVISION_ARCHS + ("xrv_densenet121",)


def convert(arch: str, source: str, output: str, *, in_channels: int | None = None,
            head: bool = False) -> dict:
  """Converts ``source`` (a state dict file) for ``arch`` and writes ``output``; returns the variables.

  ``in_channels`` defaults to 1 for ``xrv_densenet121`` and 3 otherwise.
  """
  if arch not in ARCHS:
    raise KeyError(f"unknown --arch {arch!r}; known: {list(ARCHS)}")
  state = pretrained.load_state_dict(source)
  if arch == "xrv_densenet121":
    variables = pretrained.convert_xrv_densenet121(state, in_channels=in_channels or 1, head=head)
  else:
    variables = pretrained.convert_torchvision(arch, state, in_channels=in_channels or 3, head=head)
  pretrained.save_flax(variables, output)
  return variables


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--arch", required=True, choices=ARCHS)
  parser.add_argument("--input", required=True, help="state dict file: .pth, .pt, .safetensors or .npz")
  parser.add_argument("--output", required=True, help="converted variables (.npz)")
  parser.add_argument("--in_channels", type=int, default=None,
                      help="image channels of the model (default: 3; 1 for xrv_densenet121); "
                           "3 -> 1 sums the first conv kernel")
  parser.add_argument("--head", action="store_true", help="also convert the classifier into 'head/...'")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    variables = convert(args.arch, args.input, args.output, in_channels=args.in_channels, head=args.head)
  except (FileNotFoundError, ImportError, KeyError, ValueError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str quotes
    print(f"cxr-convert-weights: error: {message}", file=sys.stderr)
    sys.exit(2)
  counts = {k: sum(v.size for v in traverse_util.flatten_dict(t).values())
            for k, t in variables.items()}
  print(f"wrote {os.path.abspath(args.output)}: {counts}")


def run():
  main()


if __name__ == "__main__":
  run()
