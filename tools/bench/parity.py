"""``mmssl bench parity`` (also ``mmssl bench --compare open_clip --quality``): does mmssl learn as well as open_clip?

The same small CLIP (Radford et al. 2021) is trained by both frameworks for the same number of steps on the same
shards, then both are scored on the same held-out images, the way a user measures a CLIP:

* **data**: real Fashion-MNIST (`data_pipelines.sources.fashion_mnist`: ``--train-images`` training images, each
  with a caption from the class name and a template), decoded by mmssl's training stream (resized to
  ``--image-size`` px, 3 channels) for both frameworks, in the same order; captions tokenised by one
  sentencepiece vocabulary of the captions (``<s> ... </s>``), which both text towers read (open_clip pools at
  that ``</s>``: its ``pool_type: eos``). open_clip's own webdataset loader is not used: with webdataset 1.0.x
  it fails (``KeyError: 'fname'`` in its ``group_by_keys_nothrow``), so it is fed mmssl's decoded batches.
* **open_clip** (its factory's ViT + causal text transformer, EOT pooling): ``open_clip_train.train.train_one_epoch``
  itself, with open_clip_train's defaults for what is not stated (AdamW groups without decay on gains, biases and
  the logit scale; ``cosine_lr``; no gradient clipping, ``--grad-clip-norm`` unset).
* **mmssl**: `pretrain.trainer.Trainer.fit` on the shards (the real loader, DeepSpeed engine, ZeRO-0, one rank)
  with the shipped ``--recipe`` (``clip-tiny``) and only the sizes and the stated hyperparameters overridden, so
  the recipe's own defaults (towers, pooling, initialisation, weight-decay groups, clipping) are what is measured.
* **stated for both**: global batch, steps, peak lr with linear warm-up then cosine to 0, AdamW
  ``(β1, β2, ε) = (0.9, 0.98, 1e-6)``, weight decay, fp32, tower widths / depths / heads, joint dimension.

Scores on ``--test-images`` held-out images and their captions (embeddings L2-normalised):

* final loss: the mean symmetric InfoNCE over the last ``--loss-window`` steps;
* image->text and text->image R@1 where a hit is a retrieved item of the query's class
  (`tools.evaluation.retrieval.recall_both_ways` with the class as the group);
* zero-shot top-1 with one prompt per class, ``"a photo of a {}."``, argmax of the cosine similarity.

Each framework runs ``--seeds`` seeds (model initialisation and data order); the table gives mean, min and max.
mmssl is "within open_clip's spread" on a metric when its mean is at least open_clip's minimum (for the loss: at
most open_clip's maximum).

    mmssl bench parity [--steps 500] [--seeds 0 1 2] [--json out.json] [--set model.text.pool=mean ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from mmssl.tools.bench.clip_sides import BatchLoader, ClipSize, DataInfo, open_clip_config
from mmssl.tools.bench.device import bench_device, check_counts
from mmssl.tools.bench.open_clip import run_and_report
from mmssl.tools.errors import ToolError

PROMPT = "a photo of a {}."
METRICS = ("final_loss", "image_to_text_R@1", "text_to_image_R@1", "zero_shot_top1")


# the shared model and optimisation sizes (open_clip's comparison's `ClipSize`, at the sizes of this benchmark)
PARITY_SIZE = ClipSize(image_size=64, patch_size=8, width=64, depth=2, heads=2, context=16, embed_dim=64, lr=1e-3,
                       weight_decay=0.2, warmup_steps=20)


@dataclass
class ParityConfig:
    """What both frameworks share: ``size`` (towers, lr, warm-up, weight decay) and the run below."""

    size: ClipSize = field(default_factory=lambda: ClipSize(**asdict(PARITY_SIZE)))
    steps: int = 500
    batch: int = 64
    train_images: int = 4000
    test_images: int = 500
    loss_window: int = 50
    recipe: str = "clip-tiny"
    overrides: list[str] = field(default_factory=list)  # extra mmssl recipe overrides (``--set``)


# --- data -----------------------------------------------------------------------------------------------------
def prepare_data(workdir: Path, cfg: ParityConfig) -> tuple[Path, Path]:
    """Fashion-MNIST shards (``train`` / ``test``) and the captions' sentencepiece model."""
    from mmssl.data_pipelines.sources import fashion_mnist
    from mmssl.data_pipelines.tokenizer_training import train_sentencepiece

    data = workdir / f"fashion-mnist-{cfg.train_images}"
    if not (data / "train" / "index.json").is_file():
        fashion_mnist.build(data, shard_size=max(8, cfg.train_images // 8), limit=cfg.train_images)
    spm = data / "spm.model"
    if not spm.is_file():
        captions = [t.format(c) for c in fashion_mnist.CLASSES for t in fashion_mnist.TEMPLATES]
        train_sentencepiece(captions + [PROMPT.format(c) for c in fashion_mnist.CLASSES], spm, vocab_size=64)
    return data, spm


def mmssl_recipe(workdir: Path, cfg: ParityConfig, data: Path, spm: Path, seed: int) -> Path:
    """``base: <recipe>`` with the sizes, the data and the stated hyperparameters; nothing else is set."""
    size = cfg.size
    tower = {"width": size.width, "depth": size.depth, "heads": size.heads}
    recipe = {
        "base": cfg.recipe,
        "name": f"parity-{cfg.recipe}",
        "data": {"train": str(data / "train"), "batch_size": cfg.batch, "seed": seed},
        "model": {"embed_dim": size.embed_dim,
                  "image": {**tower, "image_size": size.image_size, "patch_size": size.patch_size, "in_chans": 3,
                            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
                  "text": {**tower, "tokenizer": str(spm), "max_len": size.context}},
        "train": {"steps": cfg.steps, "lr": size.lr, "warmup_steps": size.warmup_steps, "min_lr_ratio": 0.0,
                  "weight_decay": size.weight_decay, "betas": [0.9, 0.98], "eps": 1e-6, "precision": "fp32",
                  "zero_stage": 0, "seed": seed, "threads": torch.get_num_threads(), "log_every": 1,
                  "ckpt_every": 0, "tensorboard": False},
    }
    path = workdir / f"recipe-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def load(recipe_path: Path, overrides: Sequence[str] = ()) -> Any:
    from mmssl.pretrain.recipe import load_recipe

    return load_recipe(str(recipe_path), list(overrides))


def training_batches(recipe: Any, steps: int) -> Iterator[Any]:
    """The batches mmssl's trainer reads (rank 0 of 1, from batch 0), decoded to their final form."""
    from mmssl.pretrain.data import build_stream

    stream = iter(build_stream(recipe, rank=0, world_size=1, start_batch=0))
    for _ in range(steps):
        yield next(stream)


@dataclass
class HeldOut:
    images: Tensor  # [N, 3, H, W], the evaluation decoder's output
    text: dict[str, Tensor]  # input_ids / attention_mask [N, L]
    labels: Tensor  # [N] class index
    prompts: dict[str, Tensor]  # the class prompts, tokenised [C, L]


def held_out(recipe: Any, data: Path, count: int) -> HeldOut:
    """The first ``count`` test samples, decoded without augmentation, and the class prompts."""
    from mmssl.data_pipelines.batch import collate
    from mmssl.data_pipelines.shards import resolve_shards
    from mmssl.data_pipelines.sources.fashion_mnist import CLASSES
    from mmssl.data_pipelines.stream import read_once
    from mmssl.pretrain.data import eval_decoders, modality_fields

    decoders = eval_decoders(recipe)
    images, texts, labels = [], [], []
    for batch in read_once(resolve_shards(str(data / "test"), where="test shards"),
                           fields=modality_fields(recipe), decoders=decoders, batch_size=100, where="test shards"):
        images.append(batch.inputs["image"])
        texts.extend({k: v[i] for k, v in batch.inputs["text"].items()} for i in range(len(batch)))
        labels.extend(batch.meta["label_id"])
        if len(labels) >= count:
            break
    if len(labels) < count:
        raise ToolError(f"the test shards in {data / 'test'} hold {len(labels)} samples; --test-images is {count}")
    rng = np.random.default_rng(0)  # evaluation decoders are deterministic; the generator is their contract
    prompt_samples = [{"__key__": str(i), "text": decoders["text"](PROMPT.format(c).encode(), rng)}
                      for i, c in enumerate(CLASSES)]
    text = collate([{"__key__": str(i), "text": t} for i, t in enumerate(texts[:count])], ["text"]).inputs["text"]
    return HeldOut(torch.cat(images)[:count], text, torch.tensor(labels[:count]),
                   collate(prompt_samples, ["text"]).inputs["text"])


# --- scores ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def scores(encode_image: Any, encode_text: Any, data: HeldOut) -> dict[str, float]:
    """R@1 both ways (a hit: same class) and zero-shot top-1 (one prompt per class) of one trained model."""
    from mmssl.tools.evaluation.retrieval import recall_both_ways

    img = torch.cat([encode_image(data.images[i : i + 100]) for i in range(0, len(data.labels), 100)])
    txt = torch.cat([encode_text({k: v[i : i + 100] for k, v in data.text.items()})
                     for i in range(0, len(data.labels), 100)])
    recall = recall_both_ways(img, txt, data.labels, ("image", "text"), ks=(1,))
    classes = F.normalize(encode_text(data.prompts).float(), dim=-1)
    predicted = (F.normalize(img.float(), dim=-1) @ classes.T).argmax(-1)
    return {"image_to_text_R@1": recall["image->text"]["R@1"], "text_to_image_R@1": recall["text->image"]["R@1"],
            "zero_shot_top1": float((predicted == data.labels).double().mean())}


def final_loss(losses: Sequence[float], window: int) -> float:
    tail = list(losses)[-window:]
    return sum(tail) / len(tail)


# --- mmssl ----------------------------------------------------------------------------------------------------
def train_mmssl(recipe: Any, run_dir: Path) -> tuple[nn.Module, list[float]]:
    """``Trainer.fit`` on the shards; the trained model and its per-step losses (metrics.jsonl)."""
    from mmssl.pretrain.rundir import METRICS
    from mmssl.pretrain.trainer import Trainer

    trainer = Trainer(recipe, run_dir)
    trainer.fit()
    records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines() if line.strip()]
    return trainer.model.eval(), [r["loss"] for r in sorted(records, key=lambda r: r["step"])]


def mmssl_encoders(model: nn.Module) -> tuple[Any, Any]:
    def image(x: Tensor) -> Tensor:
        return model({"image": x}).embeddings["image"].float()

    def text(x: dict[str, Tensor]) -> Tensor:
        return model({"text": x}).embeddings["text"].float()

    return image, text


# --- open_clip ------------------------------------------------------------------------------------------------
class RecordingLoss(nn.Module):
    """open_clip's ``ClipLoss``, keeping each step's loss (``train_one_epoch`` does not return them)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self.values: list[Tensor] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.loss(*args, **kwargs)
        total = sum(out.values()) if isinstance(out, dict) else out
        self.values.append(total.detach())
        return out


def train_open_clip(cfg: ParityConfig, recipe: Any, seed: int, workdir: Path) -> tuple[nn.Module, list[float]]:
    """open_clip's model and ``train_one_epoch`` over the batches mmssl's trainer reads for the same seed."""
    import open_clip
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    from mmssl.architectures.modalities import get_modality

    tokenizer = get_modality("text").tokenizer(recipe.model.towers["text"])
    configs = workdir / "open_clip_configs"
    configs.mkdir(parents=True, exist_ok=True)
    name = f"mmssl-parity-{seed}"
    (configs / f"{name}.json").write_text(json.dumps(open_clip_config(cfg.size, tokenizer.vocab_size)))
    open_clip.add_model_config(configs)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, precision="fp32", output_dict=True)
    exclude = {id(p) for n, p in model.named_parameters()
               if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n}  # open_clip_train.main
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if id(p) in exclude], "weight_decay": 0.0},
                                   {"params": [p for p in params if id(p) not in exclude],
                                    "weight_decay": cfg.size.weight_decay}], lr=cfg.size.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    scheduler = cosine_lr(optimizer, cfg.size.lr, cfg.size.warmup_steps, cfg.steps)
    loss = RecordingLoss(open_clip.ClipLoss())
    args = argparse.Namespace(device="cpu", precision="fp32", distill=False, accum_freq=1, skip_scheduler=False,
                              horovod=False, grad_clip_norm=None, log_every_n_steps=10**9, batch_size=cfg.batch,
                              world_size=1, rank=0, local_rank=0, wandb=False)
    pairs = ((b.inputs["image"], b.inputs["text"]["input_ids"]) for b in training_batches(recipe, cfg.steps))
    loader = BatchLoader(pairs, cfg.steps, cfg.steps * cfg.batch)
    train_one_epoch(model, {"train": DataInfo(loader)}, loss, 0, optimizer, None, scheduler, None, args)
    return model.eval(), [float(v) for v in loss.values]


def open_clip_encoders(model: nn.Module) -> tuple[Any, Any]:
    return (lambda x: model.encode_image(x).float()), (lambda x: model.encode_text(x["input_ids"]).float())


# --- the benchmark --------------------------------------------------------------------------------------------
def spread(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cfg = _config(args)
    if "open_clip" in args.frameworks:
        from mmssl.tools.bench.open_clip import require_open_clip

        require_open_clip()
    data, spm = prepare_data(workdir, cfg)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in args.frameworks}
    for seed in args.seeds:
        recipe = load(mmssl_recipe(workdir, cfg, data, spm, seed), cfg.overrides)
        test = held_out(recipe, data, cfg.test_images)
        for name in args.frameworks:
            torch.manual_seed(seed)
            if name == "mmssl":
                model, losses = train_mmssl(recipe, workdir / f"mmssl-seed{seed}")
                encoders = mmssl_encoders(model)
            else:
                model, losses = train_open_clip(cfg, recipe, seed, workdir)
                encoders = open_clip_encoders(model)
            row = {"seed": seed, "final_loss": final_loss(losses, cfg.loss_window), **scores(*encoders, test),
                   "first_losses": [round(v, 4) for v in losses[:20]], "steps": len(losses)}
            runs[name].append(row)
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {row[k]:.4f}" for k in METRICS), file=sys.stderr)
    summary = {name: {m: spread([r[m] for r in rows]) for m in METRICS} for name, rows in runs.items()}
    result: dict[str, Any] = {"config": asdict(cfg), "seeds": list(args.seeds), "runs": runs, "summary": summary,
                              "mmssl_recipe": yaml.safe_load(mmssl_recipe(workdir, cfg, data, spm, args.seeds[0])
                                                             .read_text())}
    if {"mmssl", "open_clip"} <= set(runs):
        result["within_spread"] = within_spread(summary)
    return result


def within_spread(summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, bool]:
    """mmssl's mean against open_clip's seed range: at most its worst loss, at least its worst score."""
    ours, ref = summary["mmssl"], summary["open_clip"]
    out = {"final_loss": ours["final_loss"]["mean"] <= ref["final_loss"]["max"]}
    out.update({m: ours[m]["mean"] >= ref[m]["min"] for m in METRICS[1:]})
    return out


def report(result: dict[str, Any]) -> str:
    cfg = {**result["config"], **result["config"]["size"]}
    lines = [f"### Learning parity: CLIP ViT {cfg['width']}w x {cfg['depth']}L (patch {cfg['patch_size']}, "
             f"{cfg['image_size']} px) + text {cfg['width']}w x {cfg['depth']}L, {cfg['embed_dim']}-d; batch "
             f"{cfg['batch']}, {cfg['steps']} steps, lr {cfg['lr']:g} ({cfg['warmup_steps']} warm-up, cosine), "
             f"wd {cfg['weight_decay']:g}, fp32; {cfg['train_images']} train / {cfg['test_images']} held-out "
             f"Fashion-MNIST images; seeds {result['seeds']}; mmssl recipe {cfg['recipe']}"
             + (f" with {' '.join(cfg['overrides'])}" if cfg["overrides"] else ""), "",
             "| framework | final loss | image→text R@1 | text→image R@1 | zero-shot top-1 |",
             "|---|---:|---:|---:|---:|"]
    for name, s in result["summary"].items():
        loss = s["final_loss"]
        cells = [f"{loss['mean']:.3f} [{loss['min']:.3f}–{loss['max']:.3f}]"]
        cells += [f"{100 * s[m]['mean']:.1f} % [{100 * s[m]['min']:.1f}–{100 * s[m]['max']:.1f}]" for m in METRICS[1:]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("\nmean [min–max] over the seeds; R@1: a hit is a retrieved item of the query's class.")
    if "within_spread" in result:
        lines.append("mmssl within open_clip's seed spread or better: "
                     + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in result["within_spread"].items()))
    return "\n".join(lines)


def _config(args: argparse.Namespace) -> ParityConfig:
    size = ClipSize(**{k: getattr(args, k) for k in asdict(PARITY_SIZE)})
    run = {k: getattr(args, k) for k in asdict(ParityConfig()) if k not in ("size", "overrides")}
    return ParityConfig(size=size, **run, overrides=list(args.set or []))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmssl bench parity", description=__doc__.splitlines()[0])
    for name, default in {**asdict(PARITY_SIZE), **asdict(ParityConfig())}.items():
        if name not in ("size", "overrides"):
            p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--frameworks", nargs="+", default=["open_clip", "mmssl"], choices=["open_clip", "mmssl"])
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="extra mmssl recipe overrides (a variant to test)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--workdir", default=None, help="where shards and runs go (default: a temporary directory)")
    args = p.parse_args(argv)
    check_counts(args, ("steps", "batch", "train_images", "test_images", "loss_window", "threads"), trials=None)
    if args.width % args.heads:
        raise ToolError(f"--width {args.width} is not a multiple of --heads {args.heads}")
    if args.image_size % args.patch_size:
        raise ToolError(f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bench_device()
    return run_and_report(args, run, report)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
