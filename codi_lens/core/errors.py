"""The project's error classes: what a user got wrong, as opposed to a bug.

Every error that means "the input was wrong" (a flag, a file, a checkpoint, a position, a choice) is a
:class:`CodiLensError`; the command line reports exactly these in one ``error:`` line (see
:mod:`codi_lens.run.cli`) and lets anything else, a bug, keep its traceback. Each layer defines the errors
of its own concept as subclasses (``CheckpointError`` in loading, ``DataError`` in data, ...); the ones the
core itself raises are here.
"""

from __future__ import annotations


class CodiLensError(Exception):
    """Base of the errors that mean the input was wrong; the message names the bad flag, file, key or field."""


class ChoiceError(CodiLensError, ValueError):
    """A name that is not one of a registry's choices (an intervention, a scope, a patch kind, a dataset, ...);
    the message lists the choices."""


class FlagError(CodiLensError, ValueError):
    """A command-line flag (or the setting it stands for) with a value that cannot be used; the message names it."""


class MissingFileError(CodiLensError, FileNotFoundError):
    """A file or folder the user named does not exist (the message names it)."""


class HookNameError(CodiLensError, KeyError):
    """A hook name the model has no hook point for."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class PositionError(CodiLensError, ValueError):
    """A position or thought that the run does not reach, or an ill-formed position name."""


class LoopScheduleError(CodiLensError, NotImplementedError):
    """An analysis that needs thoughts computed one after another, asked of a loop that computes them together
    in sweeps (PCCoT); the message names the method and what to use instead."""


class PositionContextError(RuntimeError):
    """A positional hook fired outside a CODI run, where positions are not known (a usage bug, not input)."""
