"""mmssl: self-supervised multimodal pretraining on webdataset shards and a DeepSpeed engine.

This folder (``api/`` in the repository) is the top of the ``mmssl`` namespace; the rooms are folders beside it,
installed under it: ``mmssl.data_pipelines`` (shards, streams, batches), ``mmssl.architectures`` (towers, fusion,
families), ``mmssl.objectives`` (losses), ``mmssl.pretrain`` (recipes, the trainer, checkpoints), ``mmssl.tools``
(the ``mmssl`` command: export, evaluation, fine-tuning, benchmarks) and ``mmssl.recipes`` (bundled recipes).

The Python API a user starts from::

    import mmssl
    recipe = mmssl.load_recipe("clip-tiny", ["train.steps=50"])     # a bundled name or a YAML path, + overrides
    model = mmssl.load_model("runs/clip-tiny/export/model")         # an exported model, any family (eval mode)
    out = model.model({"image": images})                            # embeddings, pooled and token states

Training runs through ``mmssl pretrain RECIPE --nproc N`` (or ``torchrun ... -m mmssl pretrain ...``), which
starts the ranks; ``mmssl.train(recipe, run_dir)`` is one rank's part of it, inside a process group.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("mmssl")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"


def load_recipe(source: str, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """A recipe (`mmssl.pretrain.recipe.Recipe`) from a bundled name or a YAML file, with dotted overrides."""
    from mmssl.pretrain.recipe import load_recipe as load

    return load(source, overrides)


def load_model(path: str, *, random_init: bool = False) -> Any:
    """An exported model (``mmssl export RUN --out DIR`` writes ``DIR/model``), of any family, in eval mode."""
    from mmssl.tools.export.model import load_model as load

    return load(path, random_init=random_init)


def train(recipe: Any, run_dir: str) -> dict[str, Any]:
    """Train (or resume) ``recipe`` as one rank of the current process group; returns the run summary."""
    from pathlib import Path

    from mmssl.pretrain.trainer import train as run

    return run(recipe, Path(run_dir))
