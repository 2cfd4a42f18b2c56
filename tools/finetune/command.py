"""``mmssl finetune ENCODER_DIR``: supervised fine-tuning of an exported encoder with a linear head on DeepSpeed.

Protocol: the encoder's tower + a new linear head (`tools.finetune.model.Classifier`) minimise the mean
cross-entropy ``-(1/G) Σ_i log softmax(W·f(x_i) + b)[y_i]`` with AdamW (decay / no-decay groups, optional
layer-wise LR decay ``lr · decay^(L - layer)``, BEiT-style), linear warmup + cosine schedule over all steps, on a
real DeepSpeed engine (ZeRO 0-3, fp32 / bf16) per rank. Inputs are augmented with the modality's training decoder.
After every epoch the validation top-1 is measured on all ranks and reduced; the best epoch's consolidated fp32
weights are written (safetensors, temp + ``os.replace``); training stops after ``patience`` epochs without a strict
improvement. The test top-1 is then measured once with the best weights. How samples are split across ranks
(pad by wrap-around, equal steps on every rank) is described in `tools.finetune.data`.

Output in ``out_dir``: ``results.json``, ``finetune_curve.png``, ``model.safetensors`` + ``classifier.json`` (the
best tower + head, `tools.finetune.model.load_classifier`) and ``encoder/`` (the fine-tuned tower as an exported
encoder, usable by ``mmssl probe`` and ``retrieval``).

Launch: ``launch_finetune(cfg, nproc)`` checks the configuration, the encoder and the labels in this process, then
starts ``nproc`` local ranks with torchrun running `tools.finetune.rank`; under an external launcher (``WORLD_SIZE``
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmssl.architectures.errors import ArchitectureError
from mmssl.data_pipelines.shards import atomic_write_text
from mmssl.pretrain.precision import PRECISIONS
from mmssl.tools.errors import ToolError
from mmssl.tools.evaluation.probe import fmt_pct
from mmssl.tools.finetune.config import CONFIG_FILE, RESULTS_FILE, FinetuneConfig, check_config

if TYPE_CHECKING:
    from mmssl.architectures.encoder import Encoder


def check_encoder(cfg: FinetuneConfig) -> Encoder:
    """The encoder directory is an export, and ``--freeze k`` fits its layer groups; returns the encoder built
    for its shapes only (meta device: no weights read)."""
    from mmssl.architectures.encoder import Encoder
    from mmssl.tools.finetune.model import Classifier, apply_freeze

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
        from mmssl.tools.finetune.rank import run_rank

        return run_rank(cfg)
    from mmssl.tools.finetune.data import load_splits

    load_splits(cfg, encoder, decode_check=False)  # label field present, >= 2 classes: before any rank starts
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mmssl.tools.finetune.rank", "--config", str(out / CONFIG_FILE)]
    print(f"mmssl: fine-tuning {cfg.encoder_dir} on {nproc} rank(s) -> {out}", file=sys.stderr, flush=True)
    code = subprocess.call(cmd, env=child_env(nproc))
    if code != 0:
        print(f"mmssl: error: fine-tuning failed (exit code {code})", file=sys.stderr)
    return code


# ------------------------------------------------------------------------------------------------ reporting
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
    parser = argparse.ArgumentParser(prog="python -m mmssl.tools.finetune.command")
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
