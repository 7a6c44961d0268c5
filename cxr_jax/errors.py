"""Errors that are the user's to fix, not bugs.

Library code (data, training, weights) raises ``UserError`` or one of its
subclasses for a mistake in a config, a flag, a path or the data; the console
scripts (``cxr_jax.cli.flags.run_app``) print its message as one line
``cxr-<cmd>: error: ...`` and exit with status 2, and keep the traceback for
every other exception (a bug). The message names the key, file or row to fix.

The subclasses are also the built-in exception a caller would expect, so code
that catches ``KeyError`` or ``FileNotFoundError`` still does.
"""

from __future__ import annotations


class UserError(ValueError):
  """A mistake in the user's config, flags, paths or data; its message is one line."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ""


class UnknownKey(UserError, KeyError):
  """A config field, preset key, split or name that does not exist."""


class MissingPath(UserError, FileNotFoundError):
  """A file or folder the user named that does not exist (or holds nothing usable)."""
