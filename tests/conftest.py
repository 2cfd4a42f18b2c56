"""Shared fixtures: small real shards built from the installed Asterisk prompts, tiny recipes, rank launchers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def asterisk_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 200 real prompts in 8-sample shards (train ~170 in ~21 shards, test ~30), plus spm.model."""
    from mmssl.data_pipelines.sources import asterisk

    asterisk.check_installed()
    out = tmp_path_factory.mktemp("asterisk")
    asterisk.build(out, limit=200, shard_size=8, vocab_size=400)
    return out


PROMPT_WORDS = ["please", "enter", "your", "password", "followed", "by", "the", "pound", "key", "thank", "you", "for",
                "calling", "goodbye", "press", "one", "two", "sales", "support", "number", "have", "dialed", "is",
                "not", "in", "service"]


@pytest.fixture(scope="session")
def spm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small sentencepiece model (with mmssl's specials and <mask>) trained on 60 random phone-prompt sentences,
    for unit tests that need a real tokenizer but not the shards."""
    import random

    from mmssl.data_pipelines.tokenizer_training import train_sentencepiece

    rng = random.Random(0)
    sents = [" ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(3, 10))) for _ in range(60)]
    return train_sentencepiece(sents, tmp_path_factory.mktemp("spm") / "spm.model", vocab_size=100)


@pytest.fixture(scope="session")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """About 200 real Fashion-MNIST images with their templated captions in 10-sample shards, and a sentencepiece
    model trained on those captions (`mmssl make-shards fashion-mnist` writes none)."""
    from mmssl.data_pipelines.reader import ShardReader
    from mmssl.data_pipelines.shards import resolve_shards
    from mmssl.data_pipelines.sources import fashion_mnist
    from mmssl.data_pipelines.tokenizer_training import train_sentencepiece

    out = tmp_path_factory.mktemp("fashion")
    fashion_mnist.build(out, limit=200, shard_size=10)
    reader = ShardReader(where="test")
    captions = [s["txt"].decode() for url in resolve_shards(str(out / "train")) for _, s in reader.samples(url)]
    return out / "train", train_sentencepiece(captions, out / "spm.model", vocab_size=60)


@pytest.fixture(scope="session")
def ktuberling_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """About 60 KTuberling pictures (English: spoken + written word; about half have no recording) in 4-sample
    shards, and the sentencepiece model `mmssl make-shards ktuberling` trains on the concept names."""
    from mmssl.data_pipelines.shards import DataError
    from mmssl.data_pipelines.sources import ktuberling
    from mmssl.data_pipelines.tokenizer_training import train_sentencepiece

    try:
        ktuberling.check_installed()
    except DataError as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("ktuberling")
    ktuberling.build(out, image_size=32, limit=60, shard_size=4)
    pictures, _ = ktuberling.read_pictures()
    spm = train_sentencepiece(sorted({ktuberling.english_label(p.concept) for p in pictures}), out / "spm.model",
                              vocab_size=256)
    return out / "train", spm


@pytest.fixture(scope="session")
def frozen_parts(fashion: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides pointing the stitched tiny recipes at the real ImageNet EfficientNet-Lite0 and a seeded random
    GPT-2 over the Fashion-MNIST captions' vocabulary (what `mmssl weights` writes)."""
    from mmssl.architectures.stitching.pretrained import efficientnet_lite0_weights, random_causal_lm

    out = tmp_path_factory.mktemp("weights")
    lm = random_causal_lm(out / "tiny-causal-lm", fashion[1])
    return [f"model.image.pretrained={efficientnet_lite0_weights(out)}", f"model.text.pretrained={lm}"]


def tiny_recipe_dict(root: Path, **sections: dict) -> dict:
    """A recipe small enough for a few CPU steps in seconds, on the real shards."""
    recipe = {
        "name": "tiny",
        "data": {"train": str(root / "train"), "eval": str(root / "test"), "batch_size": 8, "shuffle_buffer": 16,
                 "streams_per_rank": 2, "num_workers": 0, "seed": 0},
        "model": {
            "embed_dim": 32,
            "audio": {"width": 48, "depth": 1, "heads": 2, "frames": 64, "n_mels": 32, "patch_size": [16, 16],
                      "hop_length": 160, "pool": "avg", "norm_mean": -10.0, "norm_std": 5.0},
            "text": {"tokenizer": str(root / "spm.model"), "width": 48, "depth": 1, "heads": 2, "max_len": 16},
        },
        "objectives": {"contrastive": {"pairs": [["audio", "text"]]}},
        "train": {"steps": 4, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "zero_stage": 2, "precision": "fp32",
                  "tensorboard": False, "threads": 1},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_ranks(nproc: int, args: list[str], *, timeout: int = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N`` over ``args`` (a script or ``-m module`` and its arguments)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def mmssl_in_process(*args: str) -> subprocess.CompletedProcess:
    """``mmssl ARGS`` through the CLI's ``main`` in this process: the same parsing, commands and one-line errors as
    the console script, without a fresh interpreter's imports (most of a failing command's time). Returns what the
    command printed and its exit code; an exception the CLI does not turn into an error line propagates (the
    subprocess form would print its traceback)."""
    import contextlib
    import io

    from mmssl.tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(["mmssl", *args], code, out.getvalue(), err.getvalue())


def mmssl(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "mmssl", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
