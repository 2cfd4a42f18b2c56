"""The tri-modal real data set: KTuberling's drawn pictures, spoken words and written words (Debian packages).

Source: Debian ``ktuberling-data`` (KDE's "Potato Guy" toy, Éric Bischoff, Albert Astals Cid et al. 1999-2017;
GPL-2+, ``pics/moon.svg`` CC-BY; see ``/usr/share/doc/ktuberling-data/copyright``) and ``librsvg2-bin``
(``rsvg-convert``, to rasterise the sprites). The shards written here are a derived work under the same licenses.

What the package holds (ktuberling-data 4:22.12.3, counted by `read_pictures` / `read_recordings`):

* 10 playgrounds (``pics/<theme>.theme`` XML + one SVG each) listing 495 ``<object name=... sound=...>`` sprites:
  493 distinct pictures (robot_workshop lists ``scissorArm1``/``scissorArm2`` twice; counted and dropped) of 190
  concepts (the ``sound`` attribute is the concept id; 12 concepts - eye, nose, hat, ... - are drawn in both the
  default and the potato-game playgrounds). 13 butterflies sprites (``circles``, ``eyeLeft``, ``purpleRight``, ...)
  render no visible pixel with rsvg-convert 2.54 and are skipped, so 480 pictures reach the shards;
* 27 ``sounds/<lang>.soundtheme`` files mapping a concept id to a recording (``.ogg`` Vorbis, ``.wav`` PCM, ``.opus``;
  8 to 48 kHz, some stereo), 1,841 recordings of pictured concepts in 26 languages. Concepts recorded, per language:
  ca, fr, nn, uk 190; da, lt 167; ru 164; de, en, gl, wa 71; el, sl 70; es, ga, it, nds, nl, pt, ro, sv 13;
  fi and sr, sr@latin, sr@ijekavian, sr@ijekavianlatin 11; ``id`` lists 199 files none of which is installed.

Each sample is one (picture, language) pairing::

    __key__  ``<theme>__<object>__<language>`` (characters outside ``[A-Za-z0-9_-]`` -> ``_``),
    png      the sprite's drawn pixels fitted into ``image_size`` (aspect ratio kept; `rasterise`), composited on
             white and centred on a white ``image_size`` square (RGB),
    wav      the concept's spoken word in that language: decoded with ``soundfile``, mixed to mono, resampled to
             ``sample_rate`` (band-limited: the FFT spectrum truncated or zero-padded) and stored as 16-bit PCM WAV;
             absent when the language has no recording of the concept (a missing modality, which the framework
             handles: the sample keeps image + text; ``require_audio=True`` drops such pairings instead),
    txt      the concept's written word (below),
    json     {"concept", "label", "language", "theme", "object", "text_language", "audio_file", "duration_s"}.

**The written word.** The package has no localised written names: the soundthemes map an English concept id to a
file, the ``.mo`` catalogues translate only the UI, and the file names are English for de/el/ru/uk/... So ``txt``
is the English word for every language (``text_language: "en"``): the concept id without its playground prefix
(``egypt_``, ``moon_``, ``tv_``, ...), ``_``/``-`` -> space, the ids' misspellings corrected (`SPELLING`). For
``en`` the three modalities name the same word; for the others the triple is cross-lingual (a French recording of
"chameau" with the written word "camel").

**The probe label** is ``label``, the English word: 178 classes (``ball``, ``tv_ball`` and ``robot_workshop_ball``
share one).

**The split** is by picture, stratified by concept, and depends on neither ``limit`` nor ``languages`` (all the
languages of one picture land in the same split, so no drawing is in both): within each concept the pictures are
ordered by ``sha1("<theme>/<object>")`` and the first ``min(n - 1, max(1, round(n · test_fraction)))`` go to
``test`` when the concept has ``n >= 2`` pictures; a concept with one picture stays in ``train``. So every test
concept also has training pictures (unseen drawings of seen words). With the default 0.2: 373 train / 120 test
pictures (364 / 116 rendered; 101 concepts, 91 labels in test).

A sprite rsvg-convert cannot render is skipped and counted (``skipped["broken_sprite"]``, the file and id in
``skipped_examples``), a recording soundfile cannot decode likewise (``broken_recording``); neither stops the
build. Full build on 2 cores: ``languages=("en",)`` 480 samples (235 with audio) in about 38 s; all 26 languages
12,480 samples (6,160 with audio, 300 MB) in about 46 s - rasterising (two rsvg-convert runs per sprite) dominates.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import wave
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from mmssl.data_pipelines.shard_plan import write_shards
from mmssl.data_pipelines.shards import DataError, DatasetIndex

ROOT = Path("/usr/share/ktuberling")
INSTALL_COMMAND = "apt-get install -y --no-install-recommends ktuberling-data librsvg2-bin"
LICENSE = "GPL-2+ (KTuberling developers; pics/moon.svg CC-BY; Debian ktuberling-data)"
RSVG = "rsvg-convert"
THEME_PREFIXES = ("robot_workshop_", "butterflies_", "pizzeria_", "egypt_", "moon_", "xmas_", "tv_")
SPELLING = {"brocolli": "broccoli", "sphynx": "sphinx", "whitch": "witch", "dowe": "dove", "frier": "friar",
            "sherif": "sheriff", "fallingstar": "falling star", "palmtree": "palm tree", "fireengine": "fire engine",
            "moonwalker": "moon walker", "volley": "volleyball"}
MAX_EXAMPLES = 10
SUPERSAMPLE = 2  # render at twice the target size, then downscale (antialiasing)
MAX_RENDER_PIXELS = 16_000_000  # cap on the second render of a whole-document-sized box
T = TypeVar("T")


@dataclass(frozen=True)
class Picture:
    theme: str  # the playground, e.g. "egypt"
    object_id: str  # the SVG element id of the sprite
    concept: str  # the soundtheme name, e.g. "egypt_camel"
    svg: Path

    @property
    def name(self) -> str:
        return f"{self.theme}/{self.object_id}"


def english_label(concept: str) -> str:
    """``egypt_palmtree`` -> ``palm tree``; ``tux-angry`` -> ``tux angry``; ``tv_breakdown_lorry`` -> ``breakdown
    lorry`` (playground prefix dropped, ``_``/``-`` -> space, misspellings of the ids corrected)."""
    for prefix in THEME_PREFIXES:
        if concept.startswith(prefix):
            concept = concept[len(prefix):]
            break
    return " ".join(SPELLING.get(word, word) for word in re.split(r"[_\-\s]+", concept) if word)


def sample_key(picture: Picture, language: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{picture.theme}__{picture.object_id}__{language}")


def check_installed(root: Path = ROOT) -> None:
    """Raise `DataError` naming what is missing and the command that installs it."""
    for path in (root / "pics", root / "sounds"):
        if not path.is_dir():
            raise DataError(f"KTuberling data not installed ({path} is missing); install it with: {INSTALL_COMMAND}")
    if shutil.which(RSVG) is None:
        raise DataError(f"{RSVG} (to rasterise the KTuberling sprites) is not on PATH; install it with: "
                        f"{INSTALL_COMMAND}")
    try:
        import soundfile  # noqa: F401
    except ImportError:
        raise DataError("the Python package `soundfile` (to decode the KTuberling recordings) is not installed; "
                        "install it with: pip install soundfile") from None


def read_pictures(root: Path = ROOT) -> tuple[list[Picture], Counter[str]]:
    """Every sprite of every playground, sorted by (theme, object id); and counts of what was dropped."""
    dropped: Counter[str] = Counter()
    pictures: dict[tuple[str, str], Picture] = {}
    for theme_file in sorted((root / "pics").glob("*.theme")):
        xml = ET.parse(theme_file).getroot()
        svg = theme_file.parent / xml.get("gameboard", "")
        if not svg.is_file():
            raise DataError(f"{theme_file}: its gameboard {svg.name!r} is missing")
        for obj in xml.iter("object"):
            object_id, concept = obj.get("name"), obj.get("sound")
            if not object_id or not concept:
                dropped["object_without_name_or_sound"] += 1
                continue
            if (theme_file.stem, object_id) in pictures:
                dropped["duplicate_object"] += 1
                continue
            pictures[(theme_file.stem, object_id)] = Picture(theme_file.stem, object_id, concept, svg)
    return [pictures[k] for k in sorted(pictures)], dropped


def available_languages(root: Path = ROOT) -> list[str]:
    return sorted(p.stem for p in (root / "sounds").glob("*.soundtheme"))


def read_recordings(language: str, root: Path = ROOT) -> tuple[dict[str, Path], int]:
    """Concept -> recording file for ``language`` (files that exist), and how many listed files are missing."""
    theme = root / "sounds" / f"{language}.soundtheme"
    if not theme.is_file():
        raise DataError(f"languages: no KTuberling recordings for {language!r} ({theme} is missing); available: "
                        f"{', '.join(available_languages(root))}")
    recordings: dict[str, Path] = {}
    missing = 0
    for sound in ET.parse(theme).getroot().iter("sound"):
        name, file = sound.get("name"), sound.get("file")
        if not name or not file:
            continue
        path = root / "sounds" / file
        if path.is_file():
            recordings.setdefault(name, path)
        else:
            missing += 1
    return recordings, missing


def split_pictures(pictures: Sequence[Picture], test_fraction: float) -> dict[str, str]:
    """Picture name -> ``train`` / ``test``: stratified by concept, ordered by hash (module docstring)."""
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    by_concept: dict[str, list[Picture]] = defaultdict(list)
    for p in pictures:
        by_concept[p.concept].append(p)
    split: dict[str, str] = {}
    for members in by_concept.values():
        members = sorted(members, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())
        n = len(members)
        n_test = 0 if n < 2 or test_fraction == 0.0 else min(n - 1, max(1, int(n * test_fraction + 0.5)))
        for i, p in enumerate(members):
            split[p.name] = "test" if i < n_test else "train"
    return split


def _render(picture: Picture, zoom: float) -> Image.Image:
    """``rsvg-convert --export-id`` at ``zoom``, as RGBA; `DataError` naming the file and id when it fails."""
    cmd = [RSVG, f"--export-id={picture.object_id}", f"--zoom={zoom:.6f}", "--format=png", str(picture.svg)]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        raise DataError(f"{picture.svg}#{picture.object_id}: {RSVG} timed out") from None
    if done.returncode != 0 or not done.stdout:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise DataError(f"{picture.svg}#{picture.object_id}: {RSVG} failed ({message[-1] if message else 'no output'})")
    try:
        return Image.open(io.BytesIO(done.stdout)).convert("RGBA")
    except OSError as exc:
        raise DataError(f"{picture.svg}#{picture.object_id}: {RSVG} wrote an unreadable PNG ({exc})") from None


def rasterise(picture: Picture, size: int) -> bytes:
    """The sprite as a ``size`` x ``size`` RGB PNG, its drawn pixels filling the square (aspect ratio kept).

    ``rsvg-convert``'s box for an element can be much larger than what is drawn (invisible members of the group),
    so a first render at zoom 1 finds the drawn (alpha > 0) box; a second renders it at ``SUPERSAMPLE`` x the
    target size (vector-sharp), which is cropped to the drawn pixels, downscaled with a Lanczos filter to fit
    ``size``, composited on white and centred on a white square.
    """
    first = _render(picture, 1.0)
    box = first.getchannel("A").getbbox()
    if box is None:
        raise DataError(f"{picture.svg}#{picture.object_id}: the sprite renders no visible pixel")
    drawn = max(box[2] - box[0], box[3] - box[1])
    zoom = min(SUPERSAMPLE * size / drawn, (MAX_RENDER_PIXELS / (first.width * first.height)) ** 0.5)
    sprite = _render(picture, zoom)
    box = sprite.getchannel("A").getbbox()
    if box is None:
        raise DataError(f"{picture.svg}#{picture.object_id}: the sprite renders no visible pixel at zoom {zoom:.3f}")
    sprite = sprite.crop(box)
    scale = size / max(sprite.size)
    fitted = (min(size, max(1, round(sprite.width * scale))), min(size, max(1, round(sprite.height * scale))))
    sprite = sprite.resize(fitted, Image.Resampling.LANCZOS)
    on_white = Image.alpha_composite(Image.new("RGBA", sprite.size, (255, 255, 255, 255)), sprite).convert("RGB")
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(on_white, ((size - sprite.width) // 2, (size - sprite.height) // 2))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Band-limited resampling of a 1-D signal: the real spectrum truncated (down) or zero-padded (up) to the new
    length ``round(len · new / orig)``, amplitude kept (exact for band-limited periodic signals)."""
    if orig == new or x.size == 0:
        return x.astype(np.float64)
    n_out = max(1, round(x.size * new / orig))
    spec = np.fft.rfft(x.astype(np.float64))
    out = np.zeros(n_out // 2 + 1, dtype=np.complex128)
    keep = min(spec.size, out.size)
    out[:keep] = spec[:keep]
    if n_out < x.size and n_out % 2 == 0:
        out[-1] = out[-1].real  # the new Nyquist bin of a real signal is real
    return np.fft.irfft(out, n=n_out) * (n_out / x.size)


def to_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """Float samples in [-1, 1] -> mono 16-bit PCM WAV bytes (clipped, ``round(x · 32767)``)."""
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def decode_recording(path: Path, sample_rate: int) -> tuple[bytes, float]:
    """A recording as mono 16-bit PCM WAV at ``sample_rate``, and its duration in seconds."""
    import soundfile

    try:
        x, rate = soundfile.read(str(path), dtype="float64", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise DataError(f"{path}: cannot decode the recording ({exc})") from None
    mono = resample(x.mean(axis=1), int(rate), sample_rate)
    return to_wav(mono, sample_rate), mono.size / sample_rate


def _thin(pictures: list[Picture], split_of: dict[str, str], limit: int | None) -> list[Picture]:
    """About ``limit`` pictures, every n-th of each split, each split keeping its share (and at least one)."""
    if limit is None or limit >= len(pictures):
        return pictures
    if limit < 1:
        raise DataError(f"limit must be >= 1, got {limit!r}")
    kept: list[Picture] = []
    for split in ("train", "test"):
        members = [p for p in pictures if split_of[p.name] == split]
        n = min(len(members), max(1, round(limit * len(members) / len(pictures))))
        kept += [members[int(i * len(members) / n)] for i in range(n)] if members else []
    return sorted(kept, key=lambda p: (p.theme, p.object_id))


def _samples(pictures: list[Picture], pngs: dict[str, bytes], audio: dict[tuple[str, str], tuple[bytes, float]],
             recordings: dict[str, dict[str, Path]], languages: Sequence[str], root: Path,
             require_audio: bool) -> Iterator[dict]:
    for p in pictures:
        if p.name not in pngs:
            continue
        label = english_label(p.concept)
        for lang in languages:
            clip = audio.get((lang, p.concept))
            if clip is None and require_audio:
                continue
            source = recordings[lang].get(p.concept)
            meta = {"concept": p.concept, "label": label, "language": lang, "theme": p.theme, "object": p.object_id,
                    "text_language": "en", "audio_file": str(source.relative_to(root)) if source else None,
                    "duration_s": round(clip[1], 4) if clip else None}
            sample = {"__key__": sample_key(p, lang), "png": pngs[p.name], "txt": label, "json": meta}
            if clip is not None:
                sample["wav"] = clip[0]
            yield sample


def build(
    out_dir: str | Path,
    *,
    image_size: int = 64,
    languages: Sequence[str] = ("en",),
    sample_rate: int = 16000,
    test_fraction: float = 0.2,
    limit: int | None = None,
    shard_size: int = 500,
    seed: int = 0,
    require_audio: bool = False,
    workers: int | None = None,
    root: Path = ROOT,
) -> dict[str, DatasetIndex]:
    """Write ``out_dir/train`` and ``out_dir/test`` (module docstring for the members, the split and the counts).

    ``limit`` keeps every n-th picture of each split so that about ``limit`` pictures remain, at least one per
    split (each gives ``len(languages)`` samples); the split does not depend on it. ``require_audio`` drops the
    (picture, language) pairings that have no recording instead of keeping them as image + text samples (with
    several languages those repeat the same image and text once per language). ``seed`` is recorded only: the
    build has no randomness (the split is by hash). ``workers`` threads run ``rsvg-convert`` and the audio
    decoding (default: the CPU count, at most 8).
    """
    check_installed(root)
    if image_size < 8:
        raise DataError(f"image_size must be >= 8, got {image_size!r}")
    if sample_rate < 1000:
        raise DataError(f"sample_rate must be >= 1000 Hz, got {sample_rate!r}")
    languages = list(dict.fromkeys(languages))
    if not languages:
        raise DataError("languages: give at least one language")
    all_pictures, skipped = read_pictures(root)
    split_of = split_pictures(all_pictures, test_fraction)
    pictures = _thin(all_pictures, split_of, limit)
    recordings: dict[str, dict[str, Path]] = {}
    listed_missing: dict[str, int] = {}
    for lang in languages:
        recordings[lang], listed_missing[lang] = read_recordings(lang, root)

    examples: list[str] = []
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pngs: dict[str, bytes] = {}
        for p, result in zip(pictures, pool.map(_try, [rasterise] * len(pictures), pictures,
                                                   [image_size] * len(pictures)), strict=True):
            if isinstance(result, DataError):
                skipped["broken_sprite"] += 1
                examples.append(str(result))
            else:
                pngs[p.name] = result
        wanted = sorted({(lang, p.concept) for p in pictures for lang in languages if p.concept in recordings[lang]})
        audio: dict[tuple[str, str], tuple[bytes, float]] = {}
        for item, result in zip(wanted, pool.map(_try, [decode_recording] * len(wanted),
                                                 [recordings[lang][c] for lang, c in wanted],
                                                 [sample_rate] * len(wanted)), strict=True):
            if isinstance(result, DataError):
                skipped["broken_recording"] += 1
                examples.append(str(result))
            else:
                audio[item] = result

    concepts = {p.concept for p in all_pictures}
    counts = {
        "pictures": len(all_pictures),
        "concepts": len(concepts),
        "labels": len({english_label(c) for c in concepts}),
        "recordings": {lang: len(concepts & set(recordings[lang])) for lang in languages},
        "listed_recordings_missing": listed_missing,
    }
    indexes: dict[str, DatasetIndex] = {}
    for split in ("train", "test"):
        chosen = [p for p in pictures if split_of[p.name] == split]
        info = {
            "source": "ktuberling-data (Debian): KTuberling sprites, recordings, concept names",
            "license": LICENSE,
            "split": split,
            "split_policy": "by picture, stratified by concept, sha1-ordered",
            "test_fraction": test_fraction,
            "label_field": "label",
            "classes": sorted({english_label(p.concept) for p in chosen}),
            "languages": languages,
            "text_language": "en",
            "image_size": image_size,
            "sample_rate": sample_rate,
            "seed": seed,
            "require_audio": require_audio,
            "counts": counts,
            "pictures_in_split": sum(p.name in pngs for p in chosen),
            "samples_with_audio": sum((lang, p.concept) in audio for p in chosen if p.name in pngs
                                      for lang in languages),
            "skipped": dict(skipped),
            "skipped_examples": examples[:MAX_EXAMPLES],
        }
        samples = _samples(chosen, pngs, audio, recordings, languages, root, require_audio)
        indexes[split] = write_shards(samples, Path(out_dir) / split, name=f"ktuberling-{split}",
                                      max_count=shard_size, info=info)
    return indexes


def _try(fn: Callable[..., T], *args: object) -> T | DataError:
    """``fn(*args)``, or the `DataError` it raised (counted and reported by the caller, never fatal)."""
    try:
        return fn(*args)
    except DataError as exc:
        return exc
