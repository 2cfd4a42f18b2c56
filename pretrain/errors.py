"""The errors that mean bad input, one type per room, and the one list the ranks and the CLI catch.

* `mmssl.data_pipelines.shards.DataError` — shards, manifests, sources;
* `mmssl.architectures.errors.ArchitectureError` — towers, fusion, families, weights;
* `mmssl.objectives.base.ObjectiveError` — objectives and what they ask of the model;
* `PretrainError` — recipes, runs, checkpoints, storage (`RecipeError`, `CheckpointError`, `FrozenWeightsError`,
  `StorageError` are its kinds);
* `mmssl.tools.errors.ToolError` — the ``mmssl`` commands' own options and files (added by the CLI: ``tools`` sits
  above this room).

Each is printed as one ``mmssl: error:`` line and exit code 2, never a traceback.
"""

from __future__ import annotations


class PretrainError(ValueError):
    """A recipe, run directory, checkpoint or storage layout that cannot be used as given; the message names it."""


def user_errors() -> tuple[type[Exception], ...]:
    """The user-error types of every room below ``tools`` (imported here, lazily: building them costs nothing)."""
    from mmssl.architectures.errors import ArchitectureError
    from mmssl.data_pipelines.shards import DataError
    from mmssl.objectives.base import ObjectiveError

    return DataError, ArchitectureError, ObjectiveError, PretrainError
