"""The ``data:`` section of a recipe."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SourceConfig:
    """One entry of ``data.sources``: a shard set (``train``, any shard specification), its sampling ``weight``
    (relative; a sample slot picks source ``s`` with probability ``w_s / Σw``) and the ``modalities`` its samples
    may carry (default: all the model reads; e.g. ``[image]`` uses a captioned set as image-only data)."""

    name: str = ""
    train: str = ""
    weight: float = 1.0
    modalities: list[str] | None = None


@dataclass
class DataConfig:
    """Where the training shards are and how they stream.

    ``train`` / ``eval``: a dataset directory (with ``index.json``, or a directory of ``.tar`` files without one,
    e.g. img2dataset's output: `data_pipelines.shards`), an ``index.json`` path, a brace pattern, or URLs webdataset
    opens (``pipe:``, ``http(s)://``, ...; another scheme such as ``s3://`` is refused before launch, naming the
    ``pipe:`` command that streams it). ``fields`` maps a modality to the shard member extensions it is read from
    (default: the modality plug-in's own list). ``batch_size`` is per rank (the global batch is
    ``batch_size x world size x train.grad_accum``). ``num_workers`` must divide ``streams_per_rank``.
    ``views`` asks for extra independently augmented views of a modality (``{audio: 2}`` adds ``audio@1``), what
    intra-modal objectives (SLIP, SimCLR) contrast. ``retries`` / ``retry_backoff_s``: a remote shard (``pipe:``,
    http) that fails before its first sample is tried again up to ``retries`` times, waiting ``retry_backoff_s``
    seconds doubled per attempt, then skipped and counted (``unreachable_shards`` in summary.json's data_errors).
    ``sources`` replaces ``train`` with several weighted shard sets (FLAVA-style paired + unpaired data; each
    sample's missing modalities are marked absent, so each objective sees only the samples that have its
    modalities). ``sampling``: ``continuous`` (default; every sample once per epoch per reader, epochs flow into
    each other), ``exact`` (every sample exactly once per epoch across all ranks and workers: rebalanced sample
    ranges, last batch padded with empty rows; one source) or ``resampled`` (shards drawn with replacement,
    seeded); see `data_pipelines.epochs`. ``trim_padding`` (default on): the trainer cuts each batch's text to its
    longest caption, rounded up to 8 tokens (`data_pipelines.batch.trim_padding`; exact, the cut columns are padding
    in every row), where nothing depends on the padded length (`pretrain.transfer.trimmed_modalities`).
    """

    train: str = ""
    sources: list[SourceConfig] = field(default_factory=list)
    sampling: str = "continuous"
    eval: str | None = None
    fields: dict[str, list[str]] = field(default_factory=dict)
    views: dict[str, int] = field(default_factory=dict)
    batch_size: int = 32
    shuffle_buffer: int = 256
    streams_per_rank: int = 2
    num_workers: int = 1
    prefetch_factor: int = 2
    seed: int = 0
    retries: int = 3
    retry_backoff_s: float = 1.0
    trim_padding: bool = True
