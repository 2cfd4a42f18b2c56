"""The bundled real speech + transcript data set: Asterisk's core English prompts (Debian packages).

Source: Debian ``asterisk-core-sounds-en-wav`` (the recordings, 8 kHz mono 16-bit PCM, one speaker, "Allison")
and ``asterisk-core-sounds-en`` (the transcripts, ``core-sounds-en.txt.gz``, lines like ``digits/7: seven``).
License CC-BY-SA-3.0 (Digium, Inc.); the shards written here are a derived work under the same license.

Each sample becomes::

    __key__  prompt name with "/" -> "__" (webdataset keys cannot hold "."),
    wav      the recording's bytes, unchanged,
    txt      the transcript,
    json     {"prompt", "text", "family", "split", "duration_s"}.

Non-speech entries, bracketed or parenthesised (``beep: [this is a simple beep tone]``,
``silence/1: (1 second of silence)``), and transcripts without a recording are skipped and counted.

**The probe label** (never seen by pretraining): ``family``, the prompt family read off the file name. The
prefix is the directory (``digits/7`` -> ``digits``) or the first ``-``/``_``-separated word of the name
(``vm-intro`` -> ``vm``); ``conf`` and ``confbridge`` merge into ``conference``; families with fewer than 10
prompts in the whole set fall into ``other``. That gives 11 classes: conference, demo, dictate, digits, dir,
letters, other, phonetic, queue, spy, vm.

**The split** is by prompt text: a prompt goes to ``test`` when ``sha1(normalised text)`` falls in the lowest
``test_fraction`` of the hash range, so identical transcripts never straddle the split.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import wave
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mmssl.data_pipelines.shard_plan import write_shards
from mmssl.data_pipelines.shards import DataError, DatasetIndex
from mmssl.data_pipelines.tokenizer_training import train_sentencepiece

SOUNDS_DIR = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
INSTALL_COMMAND = "apt-get install -y --no-install-recommends asterisk-core-sounds-en-wav asterisk-core-sounds-en"
LICENSE = "CC-BY-SA-3.0 (Digium, Inc.; Debian asterisk-core-sounds-en)"

_MERGED_FAMILIES = {"conf": "conference", "confbridge": "conference"}
MIN_FAMILY_SIZE = 10


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str
    wav: Path

    @property
    def key(self) -> str:
        return self.name.replace("/", "__").replace(".", "_")


def prompt_prefix(name: str) -> str:
    """``digits/7`` -> ``digits``; ``vm-intro`` -> ``vm``; ``conf-full`` -> ``conference``."""
    prefix = name.split("/", 1)[0] if "/" in name else re.split(r"[-_]", name, maxsplit=1)[0]
    return _MERGED_FAMILIES.get(prefix, prefix)


def family_labels(names: list[str]) -> dict[str, str]:
    """The probe label of each prompt: its prefix, or ``other`` when fewer than 10 prompts share it."""
    counts = Counter(prompt_prefix(n) for n in names)
    return {n: prompt_prefix(n) if counts[prompt_prefix(n)] >= MIN_FAMILY_SIZE else "other" for n in names}


def split_of(text: str, test_fraction: float) -> str:
    normalised = " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())
    bucket = int(hashlib.sha1(normalised.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if bucket < test_fraction else "train"


def check_installed(sounds_dir: Path = SOUNDS_DIR, transcripts: Path = TRANSCRIPTS) -> None:
    for path in (sounds_dir, transcripts):
        if not path.exists():
            raise DataError(f"Asterisk prompts not installed ({path} is missing); install them with: {INSTALL_COMMAND}")


def read_prompts(sounds_dir: Path = SOUNDS_DIR, transcripts: Path = TRANSCRIPTS) -> tuple[list[Prompt], Counter[str]]:
    """All spoken prompts with a transcript and a recording, and counts of what was skipped and why."""
    check_installed(sounds_dir, transcripts)
    skipped: Counter[str] = Counter()
    prompts: list[Prompt] = []
    with gzip.open(transcripts, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(";") or ":" not in line:
                continue
            name, text = (part.strip() for part in line.split(":", 1))
            if not text or text.startswith(("[", "(")):
                skipped["non_speech"] += 1
                continue
            wav = sounds_dir / f"{name}.wav"
            if not wav.is_file():
                skipped["no_recording"] += 1
                continue
            prompts.append(Prompt(name=name, text=text, wav=wav))
    prompts.sort(key=lambda p: p.name)
    return prompts, skipped


def wav_duration(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate()


def _samples(prompts: list[Prompt], labels: dict[str, str], split: str, test_fraction: float) -> Iterator[dict]:
    for p in prompts:
        if split_of(p.text, test_fraction) != split:
            continue
        data = p.wav.read_bytes()
        meta = {
            "prompt": p.name,
            "text": p.text,
            "family": labels[p.name],
            "split": split,
            "duration_s": round(wav_duration(data), 4),
        }
        yield {"__key__": p.key, "wav": data, "txt": p.text, "json": meta}


def build(
    out_dir: str | Path,
    *,
    test_fraction: float = 0.15,
    shard_size: int = 24,
    vocab_size: int = 1000,
    limit: int | None = None,
    sounds_dir: Path = SOUNDS_DIR,
    transcripts: Path = TRANSCRIPTS,
) -> dict[str, DatasetIndex]:
    """Write ``out_dir/train`` and ``out_dir/test`` shards and ``out_dir/spm.model`` (trained on train text only).

    ``limit`` keeps every n-th prompt so that about ``limit`` remain (small fixtures for tests).
    """
    out = Path(out_dir)
    prompts, skipped = read_prompts(sounds_dir, transcripts)
    labels = family_labels([p.name for p in prompts])
    if limit is not None and limit < len(prompts):
        step = len(prompts) / limit
        prompts = [prompts[int(i * step)] for i in range(limit)]
    classes = sorted(set(labels.values()))
    indexes: dict[str, DatasetIndex] = {}
    for split in ("train", "test"):
        info = {
            "source": "asterisk-core-sounds-en (en_US_f_Allison)",
            "license": LICENSE,
            "split": split,
            "test_fraction": test_fraction,
            "label_field": "family",
            "classes": classes,
            "skipped": dict(skipped),
            "sample_rate": 8000,
        }
        indexes[split] = write_shards(
            _samples(prompts, labels, split, test_fraction), out / split, name=f"asterisk-{split}",
            max_count=shard_size, info=info,
        )
    train_text = [p.text for p in prompts if split_of(p.text, test_fraction) == "train"]
    train_sentencepiece(train_text, out / "spm.model", vocab_size=vocab_size)
    return indexes
