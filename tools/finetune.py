"""``mmssl finetune ENCODER_DIR``: supervised fine-tuning of an exported encoder with a linear head on DeepSpeed.

Protocol: the encoder's tower + a new linear head (`tools.finetune_model.Classifier`) minimise the mean
cross-entropy ``-(1/G) Σ_i log softmax(W·f(x_i) + b)[y_i]`` with AdamW (decay / no-decay groups, optional
layer-wise LR decay ``lr · decay^(L - layer)``, BEiT-style), linear warmup + cosine schedule over all steps, on a
real DeepSpeed engine (ZeRO 0-3, fp32 / bf16) per rank. Inputs are augmented with the modality's training decoder.
After every epoch the validation top-1 is measured on all ranks and reduced; the best epoch's consolidated fp32
weights are written (safetensors, temp + ``os.replace``); training stops after ``patience`` epochs without a strict
improvement. The test top-1 is then measured once with the best weights. How samples are split across ranks
(pad by wrap-around, equal steps on every rank) is described in `tools.finetune_data`.

Output in ``out_dir``: ``results.json``, ``finetune_curve.png``, ``model.safetensors`` + ``classifier.json`` (the
best tower + head, `tools.finetune_model.load_classifier`) and ``encoder/`` (the fine-tuned tower as an exported
encoder, usable by ``mmssl probe`` and ``retrieval``).

Launch: ``launch_finetune(cfg, nproc)`` checks the configuration, the encoder and the labels in this process, then
starts ``nproc`` local ranks with torchrun running `tools.finetune_rank`; under an external launcher (``WORLD_SIZE``
set) this process is one rank. Rank 0 writes the best weights and every rank reads them back for the test, so
``out_dir`` must be on storage all nodes see when ranks span several machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmssl.architectures.errors import ArchitectureError
from mmssl.data_pipelines.shards import atomic_write_text
from mmssl.pretrain.precision import PRECISIONS
from mmssl.tools.errors import ToolError
from mmssl.tools.finetune_model import check_layer_decay, parse_freeze
from mmssl.tools.probe import fmt_pct

CONFIG_FILE = "finetune_config.json"
RESULTS_FILE = "results.json"
CURVE_FILE = "finetune_curve.png"

if TYPE_CHECKING:
    from mmssl.architectures.encoder import Encoder


@dataclass
class FinetuneConfig:
    """Everything one fine-tuning run needs (the CLI options of ``mmssl finetune``)."""

    encoder_dir: str
    shards: str
    label: str
    out_dir: str
    test_shards: str | None = None
    val_shards: str | None = None  # else a stratified val_fraction of the training shards
    val_fraction: float = 0.2
    epochs: int = 10
    batch_size: int = 32  # per rank
    lr: float = 1e-3  # the head's peak learning rate
    weight_decay: float = 0.05
    warmup_steps: int = 0
    layer_decay: float | None = None
    freeze: str | int = "none"  # "none" | "encoder" | k (train the last k layer groups + head)
    zero_stage: int = 2
    precision: str = "fp32"
    patience: int = 0  # stop after this many epochs without a better validation top-1 (0: never)
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 0  # intra-op threads per rank (0: cores / local ranks)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_config(cfg: FinetuneConfig) -> None:
    """Value checks that need no data (`ToolError` naming the CLI option)."""
    for key in ("epochs", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ToolError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    if cfg.lr <= 0:
        raise ToolError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.warmup_steps < 0 or cfg.patience < 0 or cfg.weight_decay < 0:
        raise ToolError("--warmup-steps, --patience and --weight-decay must be >= 0")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ToolError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ToolError(f"--zero-stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.precision not in PRECISIONS:
        raise ToolError(f"--precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    check_layer_decay(cfg.layer_decay)
    cfg.freeze = parse_freeze(cfg.freeze)


def check_encoder(cfg: FinetuneConfig) -> Encoder:
    """The encoder directory is an export, and ``--freeze k`` fits its layer groups; returns the encoder built
    for its shapes only (meta device: no weights read)."""
    from mmssl.architectures.encoder import Encoder
    from mmssl.tools.finetune_model import Classifier, apply_freeze

    try:
        with torch.device("meta"):
            encoder = Encoder.from_dir(cfg.encoder_dir, random_init=True)
            model = Classifier(encoder.tower, 2)
    except ArchitectureError as exc:
        raise ToolError(f"ENCODER_DIR {cfg.encoder_dir}: {exc}") from None
    apply_freeze(model, cfg.freeze)
    return encoder


def launch_finetune(cfg: FinetuneConfig, nproc: int) -> int:
    """Check ``cfg``, then fine-tune on ``nproc`` local ranks (torchrun), or as one rank when an external launcher
    started this process (``WORLD_SIZE`` set). Returns the ranks' exit code."""
    from mmssl.pretrain.launch import child_env, under_launcher

    check_config(cfg)
    if nproc < 1:
        raise ToolError(f"--nproc must be >= 1, got {nproc}")
    encoder = check_encoder(cfg)
    out = Path(cfg.out_dir)
    if under_launcher():
        from mmssl.tools.finetune_rank import run_rank

        return run_rank(cfg)
    from mmssl.tools.finetune_data import load_splits

    load_splits(cfg, encoder, decode_check=False)  # label field present, >= 2 classes: before any rank starts
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mmssl.tools.finetune_rank", "--config", str(out / CONFIG_FILE)]
    print(f"mmssl: fine-tuning {cfg.encoder_dir} on {nproc} rank(s) -> {out}", file=sys.stderr, flush=True)
    code = subprocess.call(cmd, env=child_env(nproc))
    if code != 0:
        print(f"mmssl: error: fine-tuning failed (exit code {code})", file=sys.stderr)
    return code


def load_config(path: str | Path) -> FinetuneConfig:
    return FinetuneConfig(**json.loads(Path(path).read_text()))


# ------------------------------------------------------------------------------------------------ reporting
def plot_curve(results: dict[str, Any], path: Path) -> Path:
    """Train loss and validation top-1 against the epoch (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in results["epochs"]]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(epochs, [e["train_loss"] for e in results["epochs"]], marker="o", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (mean over the epoch)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(epochs, [100 * e["val_top1"] for e in results["epochs"]], marker="s", color="tab:orange",
             label="val top-1")
    ax2.set_ylabel("validation top-1 (%)")
    if results.get("best_epoch"):
        ax2.axvline(results["best_epoch"], color="gray", ls="--", lw=0.8)
    ax.set_title(f"fine-tuning on '{results['config']['label']}'")
    handles, labels = ax.get_legend_handles_labels()
    handles2, labels2 = ax2.get_legend_handles_labels()
    ax.legend(handles + handles2, labels + labels2, loc="center right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def format_finetune(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [f"fine-tuning of {cfg['encoder_dir']} on '{cfg['label']}' ({len(results['classes'])} classes, "
             f"freeze={cfg['freeze']}, {results['world_size']} rank(s), ZeRO-{cfg['zero_stage']}, {cfg['precision']},"
             f" {results['trainable_parameters']:,} trainable parameters)",
             f"  {'epoch':>5}  {'train loss':>10}  {'val top-1':>9}  {'lr':>9}"]
    for e in results["epochs"]:
        mark = "  *" if e["epoch"] == results["best_epoch"] else ""
        lines.append(f"  {e['epoch']:>5}  {e['train_loss']:>10.4f}  {fmt_pct(e['val_top1']):>9}  {e['lr']:>9.2e}{mark}")
    stop = f", stopped early (patience {cfg['patience']})" if results["stopped_early"] else ""
    lines.append(f"  best epoch {results['best_epoch']}: val top-1 {fmt_pct(results['best_val_top1'])}{stop}")
    test = results.get("test_top1")
    lines.append(f"  test top-1 {fmt_pct(test)} (n={results['n_test']})" if test is not None else "  no test split")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})


def cmd_finetune(args: argparse.Namespace) -> int:
    from mmssl.pretrain.launch import under_launcher

    cfg = config_from_args(args)
    code = launch_finetune(cfg, args.nproc)
    results = Path(cfg.out_dir) / RESULTS_FILE
    if code == 0 and results.is_file() and os.environ.get("RANK", "0") == "0":
        print(format_finetune(json.loads(results.read_text())), flush=True)
    if under_launcher():  # this process was a rank: skip gloo's teardown (see pretrain.worker)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def add_finetune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``finetune`` sub-command (options mirror `FinetuneConfig`)."""
    d = FinetuneConfig("", "", "", "")
    s = subparsers.add_parser("finetune", help="fine-tune an exported encoder with a linear head (DeepSpeed)")
    s.add_argument("encoder_dir", help="one encoder directory written by `mmssl export`")
    s.add_argument("--shards", required=True, help="training shards (a validation split is carved from them "
                                                   "unless --val-shards is given)")
    s.add_argument("--val-shards", default=None)
    s.add_argument("--val-fraction", type=float, default=d.val_fraction)
    s.add_argument("--test-shards", default=None)
    s.add_argument("--label", required=True, help="metadata field holding the class label")
    s.add_argument("--out", dest="out_dir", required=True, help="output directory")
    s.add_argument("--epochs", type=int, default=d.epochs)
    s.add_argument("--batch-size", type=int, default=d.batch_size, help="per rank")
    s.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (the head's)")
    s.add_argument("--weight-decay", type=float, default=d.weight_decay)
    s.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    s.add_argument("--layer-decay", type=float, default=None, help="layer-wise LR decay, e.g. 0.75 (BEiT)")
    s.add_argument("--freeze", default=d.freeze,
                   help="none (full fine-tune), encoder (head only) or k (last k layer groups + head)")
    s.add_argument("--zero-stage", type=int, default=d.zero_stage, choices=[0, 1, 2, 3])
    s.add_argument("--precision", default=d.precision, choices=list(PRECISIONS))
    s.add_argument("--patience", type=int, default=d.patience, help="early stopping on val top-1 (0: off)")
    s.add_argument("--grad-clip", type=float, default=d.grad_clip)
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--threads", type=int, default=d.threads)
    s.add_argument("--nproc", type=int, default=1, help="local ranks to start (ignored under a launcher)")
    s.set_defaults(fn=cmd_finetune)
    return s


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmssl.tools.finetune")
    add_finetune_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["finetune", *(argv if argv is not None else sys.argv[1:])])
    from mmssl.data_pipelines.shards import DataError

    try:
        code = args.fn(args)
    except (ToolError, ArchitectureError, DataError) as exc:
        print(f"mmssl: error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
