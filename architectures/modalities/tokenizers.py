"""Text tokenizers behind one small interface: a sentencepiece model or a Hugging Face ``tokenizer.json``.

``encode(text)`` returns fixed-length ``input_ids`` and ``attention_mask`` (``max_len``): for sentencepiece,
``[BOS] pieces [EOS]`` then padding; for a ``tokenizer.json``, whatever its post-processor adds (``[CLS] ... [SEP]``
for BERT WordPiece) truncated to ``max_len``, then padding. Both pickle by value (their model bytes), so they cross
into DataLoader worker processes under any start method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmssl.architectures.towers import ArchitectureError

SPM_NAME = "tokenizer.model"
HF_NAME = "tokenizer.json"


class Tokenizer:
    kind: str
    pad_id: int
    vocab_size: int
    filename: str

    def __init__(self, data: bytes, max_len: int) -> None:
        if max_len < 3:
            raise ArchitectureError(f"text max_len must be >= 3, got {max_len}")
        self.data = data
        self.max_len = max_len
        self._load()

    def _load(self) -> None:
        raise NotImplementedError

    def ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def special_ids(self) -> dict[str, int]:
        """``pad`` always; ``bos``, ``eos``, ``mask`` where the vocabulary has them (masked and autoregressive
        objectives read these)."""
        return {"pad": self.pad_id}

    def encode(self, text: str) -> dict[str, Tensor]:
        ids = self.ids(text)[: self.max_len]
        n = len(ids)
        padded = ids + [self.pad_id] * (self.max_len - n)
        mask = [1] * n + [0] * (self.max_len - n)
        return {"input_ids": torch.tensor(padded, dtype=torch.long), "attention_mask": torch.tensor(mask)}

    def save(self, out_dir: Path) -> str:
        (out_dir / self.filename).write_bytes(self.data)
        return self.filename

    def __getstate__(self) -> dict[str, Any]:
        return {"data": self.data, "max_len": self.max_len}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.data, self.max_len = state["data"], state["max_len"]
        self._load()


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"
    filename = SPM_NAME

    def _load(self) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=self.data)
        self.vocab_size = int(self.sp.get_piece_size())
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def special_ids(self) -> dict[str, int]:
        ids = {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id}
        mask = self.sp.piece_to_id("<mask>")
        if mask != self.sp.unk_id():
            ids["mask"] = mask
        return {k: int(v) for k, v in ids.items() if v >= 0}

    def ids(self, text: str) -> list[int]:
        body = self.sp.encode(text)
        prefix = [self.bos_id] if self.bos_id >= 0 else []
        suffix = [self.eos_id] if self.eos_id >= 0 else []
        return prefix + body[: self.max_len - len(prefix) - len(suffix)] + suffix


class HFTokenizer(Tokenizer):
    kind = "tokenizer.json"
    filename = HF_NAME

    def _load(self) -> None:
        from tokenizers import Tokenizer as RawTokenizer

        self.tok = RawTokenizer.from_str(self.data.decode("utf-8"))
        self.tok.no_padding()
        self.tok.enable_truncation(self.max_len)
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
        pad = next((self.tok.token_to_id(t) for t in ("[PAD]", "<pad>", "<|endoftext|>") if self.tok.token_to_id(t)
                    is not None), None)
        self.pad_id = int(pad) if pad is not None else 0

    def ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text).ids)

    def special_ids(self) -> dict[str, int]:
        ids = {"pad": self.pad_id}
        for key, names in (("bos", ("[CLS]", "<s>", "<|startoftext|>")), ("eos", ("[SEP]", "</s>", "<|endoftext|>")),
                           ("mask", ("[MASK]", "<mask>"))):
            found = next((self.tok.token_to_id(n) for n in names if self.tok.token_to_id(n) is not None), None)
            if found is not None:
                ids[key] = int(found)
        return ids


def load_tokenizer(path: str | Path, max_len: int) -> Tokenizer:
    """A sentencepiece ``.model``, a ``tokenizer.json``, or a directory holding one of them."""
    p = Path(path)
    if p.is_dir():
        found = next((p / n for n in (SPM_NAME, HF_NAME) if (p / n).is_file()), None)
        if found is None:
            found = next(iter(sorted(p.glob("*.model"))), None)
        if found is None:
            raise ArchitectureError(f"no tokenizer ({SPM_NAME}, {HF_NAME} or *.model) in directory {p}")
        p = found
    if not p.is_file():
        raise ArchitectureError(f"tokenizer not found: {p}")
    cls = HFTokenizer if p.suffix == ".json" else SentencePieceTokenizer
    try:
        return cls(p.read_bytes(), max_len)
    except ArchitectureError:
        raise
    except Exception as exc:
        raise ArchitectureError(f"cannot load tokenizer {p}: {type(exc).__name__}: {exc}") from None
