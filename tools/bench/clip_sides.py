"""The two sides of mmssl's CLIP benchmarks (``mmssl bench --compare open_clip``, ``flip``, ``parity``): the model
size both frameworks build (`ClipSize`), the Fashion-MNIST shards and mmssl recipe (`prepare`), the decoded batches
both train on (`decoded_batches`), open_clip's step (`OpenClipSide`: ``open_clip_train.train.train_one_epoch`` over an
in-memory loader) and mmssl's (`MmsslSide`: the trainer's feed and DeepSpeed step, as ``Trainer.fit`` runs it).
`tools.bench.open_clip` times them against each other."""

from __future__ import annotations

import json
from argparse import Namespace
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mmssl.tools.bench.device import bench_device, timed

OPEN_CLIP_NAME = "mmssl-bench-clip"
PRECISIONS = {"fp32": "fp32", "bf16": "amp_bf16"}  # mmssl train.precision -> open_clip --precision


@dataclass
class ClipSize:
    """Tower sizes shared by both frameworks (``--image-size`` ... ``--embed-dim``)."""

    image_size: int = 64
    patch_size: int = 8
    width: int = 256
    depth: int = 4
    heads: int = 4
    context: int = 32
    embed_dim: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.2
    warmup_steps: int = 2


# --- data -----------------------------------------------------------------------------------------------------
def prepare(workdir: Path, size: ClipSize, batch: int, precision: str, limit: int, zero_stage: int = 0,
            compile: bool = False, overrides: Sequence[str] = ()) -> Path:
    """Fashion-MNIST shards, a sentencepiece vocabulary of its captions and the mmssl recipe (with ``overrides``,
    ``KEY=VALUE`` as ``mmssl pretrain`` takes them); returns the recipe."""
    from mmssl.data_pipelines.sources import fashion_mnist
    from mmssl.data_pipelines.tokenizer_training import train_sentencepiece

    data = workdir / "fashion-mnist"
    if not (data / "train").is_dir():
        fashion_mnist.build(data, shard_size=max(64, limit // 8), limit=limit)
    spm = data / "spm.model"
    if not spm.is_file():
        captions = [t.format(c) for c in fashion_mnist.CLASSES for t in fashion_mnist.TEMPLATES]
        train_sentencepiece(captions, spm, vocab_size=64)
    tower = {"width": size.width, "depth": size.depth, "heads": size.heads, "mlp_ratio": 4.0}
    recipe = {
        "name": "bench-clip",
        "data": {"train": str(data / "train"), "batch_size": batch, "shuffle_buffer": 4 * batch,
                 "streams_per_rank": 1, "num_workers": 1, "seed": 0},
        "model": {"family": "fusion_free", "embed_dim": size.embed_dim, "head": "linear",
                  "image": {"arch": "vit_tiny_patch16_224", **tower, "pool": "token", "init": "clip",
                            "image_size": size.image_size, "patch_size": size.patch_size, "in_chans": 3},
                  "text": {"arch": "clip", **tower, "pool": "eot", "tokenizer": str(spm), "max_len": size.context}},
        "objectives": {"contrastive": {"pairs": [["image", "text"]], "init_temperature": 0.07,
                                       "max_logit_scale": 100.0}},
        "train": {"steps": 10**6, "lr": size.lr, "warmup_steps": size.warmup_steps, "min_lr_ratio": 0.0,
                  "weight_decay": size.weight_decay, "betas": [0.9, 0.98], "eps": 1e-6, "grad_clip": 1.0,
                  "zero_stage": zero_stage, "precision": precision, "seed": 0, "threads": torch.get_num_threads(),
                  "log_every": 10**6, "ckpt_every": 0, "tensorboard": False, "compile": compile},
    }
    path = workdir / f"recipe-{precision}{'-compiled' if compile else ''}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    if overrides:
        from mmssl.pretrain.recipe import load_recipe, to_dict

        path.write_text(yaml.safe_dump(to_dict(load_recipe(str(path), list(overrides))), sort_keys=False))
    return path


def decoded_batches(recipe_path: Path, count: int) -> list[Any]:
    """``count`` batches decoded by mmssl's shard stream (rank 0 of 1), kept in memory for both frameworks."""
    from mmssl.pretrain.data import build_stream
    from mmssl.pretrain.recipe import load_recipe

    stream = iter(build_stream(load_recipe(str(recipe_path)), rank=0, world_size=1, start_batch=0))
    return [next(stream) for _ in range(count)]


# --- open_clip ------------------------------------------------------------------------------------------------
def open_clip_config(size: ClipSize, vocab: int) -> dict[str, Any]:
    """open_clip's model config at ``size``; its text tower pools at the sentencepiece vocabulary's ``</s>``
    (``pool_type: eos``: both frameworks read the same token ids, `tokenizer_training`'s fixed special ids)."""
    from mmssl.data_pipelines.tokenizer_training import EOS_ID, PAD_ID

    return {"embed_dim": size.embed_dim,
            "vision_cfg": {"image_size": size.image_size, "patch_size": size.patch_size, "width": size.width,
                           "layers": size.depth, "head_width": size.width // size.heads, "mlp_ratio": 4.0},
            "text_cfg": {"context_length": size.context, "vocab_size": vocab, "width": size.width,
                         "heads": size.heads, "layers": size.depth, "mlp_ratio": 4.0, "pool_type": "eos",
                         "eos_id": EOS_ID, "pad_id": PAD_ID}}


def build_open_clip(size: ClipSize, vocab: int, workdir: Path, device: torch.device) -> torch.nn.Module:
    """The model from open_clip's factory on our config (registered as ``mmssl-bench-clip``), random init, on
    ``device`` (the one mmssl trains on)."""
    import open_clip

    path = workdir / "open_clip_configs"
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{OPEN_CLIP_NAME}.json").write_text(json.dumps(open_clip_config(size, vocab)))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model(OPEN_CLIP_NAME, pretrained=None, device=device, precision="fp32",
                               output_dict=True)


class BatchLoader:
    """``(images, token ids)`` batches as open_clip_train's loop reads a loader (``num_batches``,
    ``num_samples``); ``pairs`` may be a lazy iterator (read once)."""

    def __init__(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], num_batches: int,
                 num_samples: int) -> None:
        self.pairs, self.num_batches, self.num_samples = pairs, num_batches, num_samples

    @classmethod
    def in_memory(cls, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> BatchLoader:
        return cls(pairs, len(pairs), sum(len(p[0]) for p in pairs))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.pairs)


class DataInfo:
    """open_clip_train's ``DataInfo``: the loader ``train_one_epoch`` reads under ``data["train"]``."""

    def __init__(self, loader: BatchLoader) -> None:
        self.dataloader = loader

    def set_epoch(self, epoch: int) -> None:
        pass


class OpenClipSide:
    """open_clip_train's ``train_one_epoch`` over in-memory batches, with main.py's AdamW groups and cosine_lr."""

    name = "open_clip"

    def __init__(self, size: ClipSize, vocab: int, precision: str, batch: int, workdir: Path,
                 device: torch.device | None = None, compile: bool = False) -> None:
        import open_clip
        from open_clip_train.scheduler import cosine_lr

        device = self.device = device or bench_device()
        self.model = build_open_clip(size, vocab, workdir, device)
        self.name = "open_clip + torch.compile" if compile else "open_clip"
        exclude = [p for n, p in self.model.named_parameters()
                   if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
        ids = {id(p) for p in exclude}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        self.optimizer = torch.optim.AdamW([{"params": exclude, "weight_decay": 0.0},
                                            {"params": rest, "weight_decay": size.weight_decay}],
                                           lr=size.lr, betas=(0.9, 0.98), eps=1e-6)
        self.scheduler = cosine_lr(self.optimizer, size.lr, size.warmup_steps, 10**6)
        if compile:  # what open_clip_train.main does with --torchcompile
            self.model = torch.compile(self.model)
        self.loss = open_clip.ClipLoss()
        self.args = Namespace(device=str(device), precision=PRECISIONS[precision], distill=False, accum_freq=1,
                              skip_scheduler=False, horovod=False, grad_clip_norm=1.0, log_every_n_steps=10**9,
                              batch_size=batch, world_size=1, rank=0, local_rank=0, wandb=False)
        self.epoch = 0

    def run(self, batches: Sequence[Any]) -> float:
        from open_clip_train.train import train_one_epoch

        pairs = [(b.inputs["image"], b.inputs["text"]["input_ids"]) for b in batches]

        def epoch() -> None:  # its loop moves each batch to the device itself
            train_one_epoch(self.model, {"train": DataInfo(BatchLoader.in_memory(pairs))}, self.loss, self.epoch,
                            self.optimizer, None, self.scheduler, None, self.args)

        seconds = timed(epoch, self.device)
        self.epoch += 1
        return seconds


# --- mmssl ----------------------------------------------------------------------------------------------------
class MmsslSide:
    """`Trainer`'s model, task and DeepSpeed engine; ``run`` is ``Trainer.fit``'s step (grad_accum 1)."""

    name = "mmssl"

    def __init__(self, recipe_path: Path, run_dir: Path) -> None:
        from mmssl.pretrain.recipe import load_recipe
        from mmssl.pretrain.trainer import Trainer

        recipe = load_recipe(str(recipe_path))
        self.name = "mmssl + train.compile" if recipe.train.compile else "mmssl"
        self.trainer = Trainer(recipe, run_dir, batches=lambda rank, world, start: iter(()))
        self.model = self.trainer.engine.module
        self.device = self.trainer.device

    def step(self, batch: Any) -> torch.Tensor:
        """`pretrain.step.optimizer_step` on ``batch``: what `Trainer.step` runs, without the stream accounting."""
        from mmssl.pretrain.step import optimizer_step

        trainer = self.trainer
        [(_, moved)] = trainer.feed.take([batch])  # the feed's cut (data.trim_padding), copy and cast
        result = optimizer_step(trainer.engine, lambda: moved, grad_accum=1, cached=True, guard=trainer.guard,
                                timer=trainer.timer)
        return result.loss

    def run(self, batches: Sequence[Any]) -> float:
        return timed(lambda: [self.step(batch) for batch in batches], self.device)


def mmssl_fit(recipe_path: Path, run_dir: Path, steps: int) -> dict[str, Any]:
    """``Trainer.fit`` on the shards (real loader), ``steps`` steps; its summary (first step excluded)."""
    from mmssl.pretrain.recipe import load_recipe
    from mmssl.pretrain.trainer import train

    return train(load_recipe(str(recipe_path), [f"train.steps={steps}"]), run_dir)


def parameter_counts(open_clip_model: torch.nn.Module, mmssl_task: torch.nn.Module) -> dict[str, int]:
    return {"open_clip": sum(p.numel() for p in open_clip_model.parameters()),
            "mmssl": sum(p.numel() for p in mmssl_task.parameters())}


def vocab_size(recipe_path: Path) -> int:
    from mmssl.architectures.modalities.tokenizers import load_tokenizer
    from mmssl.pretrain.recipe import load_recipe

    return load_tokenizer(load_recipe(str(recipe_path)).model.towers["text"].tokenizer, 8).vocab_size
