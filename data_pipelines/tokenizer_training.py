"""Training a sentencepiece tokenizer on a data set's text, written next to its shards."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

# Special ids every mmssl sentencepiece model uses; the text plug-in reads them back from the model.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MASK_PIECE = "<mask>"  # id 4: the masked-language-modelling token


def train_sentencepiece(texts: Iterable[str], out_path: str | Path, *, vocab_size: int = 1000) -> Path:
    """Train a unigram sentencepiece model on ``texts`` and write it atomically to ``out_path``.

    Single-threaded and fed in the given order, so the same texts always give the same model. ``vocab_size`` is a
    soft limit (``hard_vocab_limit=False``): a small corpus gets as many pieces as it supports.
    """
    lines = [t.strip() for t in texts if t.strip()]
    if not lines:
        raise ValueError(f"no text to train a tokenizer for {out_path}")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        user_defined_symbols=[MASK_PIECE],
        num_threads=1,
        minloglevel=2,
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out)
    return out
