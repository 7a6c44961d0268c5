"""Shared flag handling of the console scripts.

Config files are plain Python (``configs/x.py``) that import their presets with
``from configs import common``; the folder holding ``configs/`` must be on
``sys.path`` before absl parses ``--config``, wherever the command runs from.

XLA:CPU defaults (``set_cpu_xla_defaults``): set in the environment before JAX
creates its CPU client, by cxr-train, cxr-eval, cxr-bench's figure processes and
the test suite, so that all of them compile alike.

``run_app`` runs every absl command: ``--help`` prints the command module's
docstring and its own flags (absl shows the key flags of ``sys.argv[0]``, which
under a console script is the generated entry point), and a user error (a
``cxr_jax.errors.UserError``, a flag or config that does not parse, an
``app.UsageError``) is one line ``cxr-<cmd>: error: ...`` with exit status 2;
anything else keeps its traceback. ``--verbose`` prints the traceback of a user
error too.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import traceback

from absl import app
from absl import flags

from cxr_jax import errors

# Re-exported: README tells users to call cxr_jax.cli.flags.set_cpu_xla_defaults().
from cxr_jax.xla_cpu import CPU_XLA_FLAGS, CPU_XLA_FLAGS_JAXLIB, set_cpu_xla_defaults  # noqa: F401


def add_config_root_to_path(argv: list[str]) -> None:
  """Puts the parent of the --config file's folder on sys.path (idempotent)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    path = value.split(":", 1)[0]
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
      sys.path.insert(0, root)


class _DropChattyInfo(logging.Filter):
  """Drops INFO records of Orbax and Grain internals (every save logs a dozen lines) and of
  JAX's backend search."""

  def filter(self, record: logging.LogRecord) -> bool:
    chatty = ("orbax" in record.pathname or "/grain/" in record.pathname
              or record.pathname.endswith("xla_bridge.py"))  # "Unable to initialize backend"
    return record.levelno >= logging.WARNING or not chatty


def quiet_library_logs() -> None:
  """Keeps the console readable: library INFO chatter off, our own INFO on."""
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_DropChattyInfo())


# TensorFlow (clu's TensorBoard writer, TFDS) prints oneDNN banners when imported; no figure of
# ours is computed by it, so the commands start it without oneDNN and without INFO logs.
TF_ENV_DEFAULTS = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "1"}


def set_tf_env_defaults(environ=None) -> dict[str, str]:
  """Sets the ``TF_ENV_DEFAULTS`` the user has not set in ``environ`` (default ``os.environ``;
  before TensorFlow is imported); returns those it set."""
  environ = os.environ if environ is None else environ
  added = {k: v for k, v in TF_ENV_DEFAULTS.items() if k not in environ}
  environ.update(added)
  return added


FLAGS = flags.FLAGS
flags.DEFINE_bool("verbose", False, "Print the traceback of an error in the config, flags, "
                  "paths or data too (otherwise one line and exit status 2).")
# Command names of the modules whose name is not the command's ('cxr-' + name).
COMMANDS = {"evaluate": "eval", "convert_weights": "convert-weights"}
USER_ERROR_EXIT = 2


def command_name(module) -> str:
  """'cxr-eval' of cxr_jax.cli.evaluate (also when run as ``python -m``)."""
  spec = getattr(module, "__spec__", None)
  leaf = (spec.name if spec else module.__name__).rsplit(".", 1)[-1]
  return "cxr-" + COMMANDS.get(leaf, leaf)


def own_help(module) -> None:
  """Makes absl's --help print ``module``'s docstring and key flags (and --verbose)."""
  main = sys.modules["__main__"]
  if main is not module:
    main.__doc__ = module.__doc__
  for name in dict.fromkeys((module.__name__, __name__)):
    for flag in FLAGS.get_key_flags_for_module(name):
      FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def _flag_value(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def config_error_message(error: BaseException, argv: list[str]) -> str:
  """One line for a KeyError / AttributeError raised while absl parsed ``--config`` (the config
  file's get_config) or a ``--config.FIELD`` override naming no field."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  # ml_collections: "'learing_rate'\nDid you mean \"learning_rate\" instead of ...?"
  match = re.fullmatch(r"'([^']*)'(?:\s*Did you mean \"([^\"]+)\".*)?", text.strip(), re.S)
  if match:
    key, guess = match.groups()
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    named = [o for o in overrides if key in o[len("--config."):].split(".")]
    where = named[0] if named else "--config." + key
    return (f"{where}: the config has no field {key!r}"
            + (f" (did you mean {guess!r}?)" if guess else ""))
  spec = _flag_value(argv, "config")
  return _one_line(f"--config={spec}: {text}" if spec else text)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parse, with a flag or config that does not parse as an ``errors.UserError``."""
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    raise errors.UserError(_one_line(e)) from e
  except (KeyError, AttributeError) as e:  # raised by the config file or an override
    raise errors.UserError(config_error_message(e, argv)) from e
  for name in list(FLAGS):
    # ml_collections keeps a config file it could not load as an _ErrorConfig that raises
    # on first use.
    error = getattr(FLAGS[name].value, "_error", None)
    if type(FLAGS[name].value).__name__ == "_ErrorConfig" and error is not None:
      spec = _flag_value(argv, name) or ""
      path = spec.split(":", 1)[0]
      raise errors.UserError(f"--{name}={spec}: no such file {path!r}" if not os.path.isfile(path)
                             else f"--{name}={spec}: {_one_line(error)}") from error
  return rest


def _usage_errors_are_user_errors(main):
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      raise errors.UserError(str(e)) from e
  return wrapped


def verbose() -> bool:
  """--verbose, read from the command line when the flags did not parse."""
  if FLAGS.is_parsed():
    return FLAGS.verbose
  return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1")
             for a in sys.argv[1:])


def exit_on_user_error(command: str, error: BaseException) -> None:
  """Prints ``command: error: <message>`` (after the traceback with --verbose); exit status 2."""
  if verbose():
    traceback.print_exception(error)
  print(f"{command}: error: {_one_line(error)}", file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_EXIT)


def run_app(main, *, config_root: bool = False, xla_defaults: bool = False) -> None:
  """``app.run(main)`` with the command module's own --help and one-line user errors;
  ``config_root``: the --config file's root on sys.path first; ``xla_defaults``: the XLA:CPU
  defaults (commands that run JAX themselves)."""
  set_tf_env_defaults()
  module = sys.modules[main.__module__]
  own_help(module)
  if config_root:
    add_config_root_to_path(sys.argv)
  if xla_defaults:
    set_cpu_xla_defaults()
  try:
    app.run(_usage_errors_are_user_errors(main), flags_parser=_parse_flags)
  except errors.UserError as e:
    exit_on_user_error(command_name(module), e)


def rejoin_paths(pieces: list[str]) -> list[str]:
  """A comma-split list flag's paths with commas put back where a path has them.

  absl's list flags split on commas, and cxr-sweep names a row's workdir after its
  overrides ('03-lr=0.001,seed=1'): consecutive pieces are joined again, longest first,
  wherever the joined name exists on disk; a piece no join makes exist stays as it is.
  """
  out, i = [], 0
  while i < len(pieces):
    found = next((j for j in range(len(pieces), i, -1)
                  if os.path.exists(",".join(pieces[i:j]))), None)
    end = found if found is not None else i + 1
    out.append(",".join(pieces[i:end]))
    i = end
  return out


def run_config_app(main, *, xla_defaults: bool = True) -> None:
  """``run_app`` of a command taking ``--config``: its config root on sys.path first, and
  for commands that run JAX themselves (``xla_defaults``) the XLA:CPU defaults."""
  run_app(main, config_root=True, xla_defaults=xla_defaults)


def config_spec() -> str:
  """The --config value of the command line with its --config.FIELD overrides, as typed."""
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  return " ".join([_flag_value(sys.argv, "config") or ""] + overrides)


def print_config(config, header: str, config_file: str | None = None) -> None:
  """Prints ``config`` field by field (--print_config): value and the comment of the field's
  declaration in ``config_file`` and the configs it imports (default: this checkout's
  ``configs/<config.method>.py``)."""
  from cxr_jax.cli import config_help  # pylint: disable=g-import-not-at-top
  config_file = config_file.split(":", 1)[0] if config_file else None
  if config_file is None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config_file = os.path.join(root, "configs", f"{config.get('method', '')}.py")
  if os.path.isfile(config_file):
    sys.stdout.write(config_help.describe(config, config_file, header))
  else:
    sys.stdout.write(config_help.render(config, {}, header=header))
