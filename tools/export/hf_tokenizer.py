"""An mmssl text tokenizer as a Hugging Face ``tokenizer.json`` directory that reproduces its token ids.

`write_hf_tokenizer` writes ``tokenizer.json`` + ``tokenizer_config.json`` (``PreTrainedTokenizerFast``), which
``transformers.AutoTokenizer.from_pretrained(DIR)`` loads offline (open_clip's ``HFTokenizer`` does exactly that for a
``local-dir:`` model). Called with ``padding="max_length", truncation=True, max_length=max_len`` it gives mmssl's
``Tokenizer.encode`` ids:

* a sentencepiece model (unigram, the kind `data_pipelines.tokenizer_training` trains) is rebuilt with the
  ``tokenizers`` library from the model's own protobuf: the same pieces and scores (``Unigram``), its normaliser
  (the precompiled character map, then, for ``remove_extra_whitespaces``, runs of spaces collapsed and the ends
  stripped), the ``▁`` word-boundary pre-tokeniser (``add_dummy_prefix``: prepended), and a post-processor that
  adds ``<bos> … <eos>`` as mmssl's tokenizer does; truncation keeps the two specials, as mmssl's
  ``bos + body[:max_len - 2] + eos``;
* a ``tokenizer.json`` is copied with its own post-processor; its padding and truncation settings are cleared (the
  caller's ``max_length`` truncates, as mmssl's ``enable_truncation(max_len)``).

``pad_token`` is the piece of mmssl's pad id. One known difference: a Hugging Face tokenizer reads its special
tokens' literal strings in raw text (``"<s>"``) as those tokens; sentencepiece never produces control ids from text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmssl.architectures.modalities.tokenizers import HFTokenizer, SentencePieceTokenizer, Tokenizer
from mmssl.tools.errors import ToolError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
UNIGRAM = 1  # sentencepiece's TrainerSpec.ModelType.UNIGRAM


def sentencepiece_as_tokenizers(tok: SentencePieceTokenizer, source: str) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes as the sentencepiece model ``tok`` plus mmssl's bos/eos."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.data)
    if proto.trainer_spec.model_type != UNIGRAM:
        kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise ToolError(f"tokenizer {source} is a sentencepiece {kind} model; the open_clip export converts unigram "
                        "models (or give the run a tokenizer.json)")
    spec = proto.normalizer_spec
    raw = RawTokenizer(Unigram([(p.piece, p.score) for p in proto.pieces], proto.trainer_spec.unk_id,
                               proto.trainer_spec.byte_fallback))
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    raw.normalizer = normalizers.Sequence(steps)
    scheme = "always" if spec.add_dummy_prefix else "never"
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    bos = [(tok.sp.id_to_piece(tok.bos_id), tok.bos_id)] if tok.bos_id >= 0 else []
    eos = [(tok.sp.id_to_piece(tok.eos_id), tok.eos_id)] if tok.eos_id >= 0 else []
    template = " ".join([f"{p}:0" for p, _ in bos] + ["$A:0"] + [f"{p}:0" for p, _ in eos])
    raw.post_processor = processors.TemplateProcessing(single=template, special_tokens=bos + eos)
    return raw


def write_hf_tokenizer(tok: Tokenizer, out_dir: str | Path, source: str) -> dict[str, str]:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` for ``tok`` into ``out_dir``; returns the special tokens
    named in the config. ``source``: where the tokenizer came from, for errors."""
    from tokenizers import Tokenizer as RawTokenizer

    out = Path(out_dir)
    if isinstance(tok, SentencePieceTokenizer):
        raw = sentencepiece_as_tokenizers(tok, source)
        piece = tok.sp.id_to_piece
    elif isinstance(tok, HFTokenizer):
        raw = RawTokenizer.from_str(tok.data.decode("utf-8"))
        raw.no_padding()
        raw.no_truncation()
        piece = raw.id_to_token
    else:
        raise ToolError(f"tokenizer {source} ({type(tok).__name__}) has no Hugging Face form")
    specials = {f"{name}_token": piece(i) for name, i in tok.special_ids().items() if name in ("pad", "bos", "eos")}
    raw.save(str(out / TOKENIZER_JSON))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": tok.max_len, "padding_side": "right",
              "truncation_side": "right", "clean_up_tokenization_spaces": False, **specials}
    (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return specials
