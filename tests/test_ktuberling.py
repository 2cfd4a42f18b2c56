"""The KTuberling tri-modal source (data_pipelines/sources/ktuberling.py), checked against independent reads of the
installed Debian files: the theme / soundtheme XML parsed here with xml.etree, the recordings decoded here with
soundfile and resampled with scipy's polyphase filter, the shards read with tarfile."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from math import gcd
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmssl.data_pipelines.shards import DataError, DatasetIndex
from mmssl.data_pipelines.sources import ktuberling

soundfile = pytest.importorskip("soundfile")

IMAGE_SIZE = 40
LANGUAGES = ("en", "fr")
LIMIT = 12


def _require_installed() -> None:
    try:
        ktuberling.check_installed()
    except DataError as exc:
        pytest.skip(f"{exc} (install with: {ktuberling.INSTALL_COMMAND})")


def read_split(directory: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, read with tarfile (not webdataset)."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for tar_path in sorted(directory.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                assert ext not in samples[key], f"{member.name} twice"
                samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def theme_objects(root: Path = ktuberling.ROOT) -> dict[tuple[str, str], str]:
    """(theme, object id) -> concept, parsed independently from pics/*.theme."""
    out: dict[tuple[str, str], str] = {}
    for path in sorted((root / "pics").glob("*.theme")):
        for obj in ET.parse(path).getroot().iter("object"):
            out.setdefault((path.stem, obj.attrib["name"]), obj.attrib["sound"])
    return out


def soundtheme(language: str, root: Path = ktuberling.ROOT) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for sound in ET.parse(root / "sounds" / f"{language}.soundtheme").getroot().iter("sound"):
        out.setdefault(sound.attrib["name"], root / "sounds" / sound.attrib["file"])
    return out


def expected_splits(objects: dict[tuple[str, str], str], test_fraction: float = 0.2) -> dict[str, str]:
    """The documented policy, re-derived: per concept, sha1-ordered, the first min(n-1, max(1, round(n·f))) test."""
    by_concept: dict[str, list[str]] = defaultdict(list)
    for (theme, obj), concept in objects.items():
        by_concept[concept].append(f"{theme}/{obj}")
    split = {}
    for names in by_concept.values():
        names.sort(key=lambda n: hashlib.sha1(n.encode()).hexdigest())
        n_test = min(len(names) - 1, max(1, math.floor(len(names) * test_fraction + 0.5))) if len(names) > 1 else 0
        split.update({n: ("test" if i < n_test else "train") for i, n in enumerate(names)})
    return split


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, DatasetIndex]]:
    _require_installed()
    out = tmp_path_factory.mktemp("ktuberling")
    indexes = ktuberling.build(out, image_size=IMAGE_SIZE, languages=LANGUAGES, limit=LIMIT, shard_size=5)
    return out, indexes


@pytest.fixture(scope="module")
def samples(built: tuple[Path, dict[str, DatasetIndex]]) -> dict[str, dict[str, dict[str, bytes]]]:
    out, _ = built
    return {split: read_split(out / split) for split in ("train", "test")}


def test_every_png_is_the_fitted_sprite_at_image_size(samples: dict) -> None:
    n = 0
    for split in samples.values():
        for key, members in split.items():
            image = Image.open(io.BytesIO(members["png"]))
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB", key
            ink = np.asarray(image).min(axis=2) < 250  # non-white pixels
            rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
            assert rows.size and cols.size, f"{key}: blank picture"
            extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
            assert extent >= IMAGE_SIZE - 3, f"{key}: drawn extent {extent} does not fill {IMAGE_SIZE}"
            n += 1
    assert n >= LIMIT  # a picture per language


def test_text_and_metadata_match_the_theme_xml(samples: dict) -> None:
    objects = theme_objects()
    for split in samples.values():
        for key, members in split.items():
            meta = json.loads(members["json"])
            concept = objects[(meta["theme"], meta["object"])]  # parsed here, independently
            assert meta["concept"] == concept
            assert key == f"{meta['theme']}__{meta['object']}__{meta['language']}".replace("@", "_")
            assert members["txt"].decode() == meta["label"] == ktuberling.english_label(concept)
            assert meta["text_language"] == "en"


def test_english_labels_of_concept_ids() -> None:
    cases = {"egypt_palmtree": "palm tree", "tv_breakdown_lorry": "breakdown lorry", "tux-angry": "tux angry",
             "robot_workshop_ball": "ball", "pizzeria_brocolli": "broccoli", "eyebrow": "eyebrow",
             "whitch-tux": "witch tux", "moon_fallingstar": "falling star", "egypt_sphynx": "sphinx"}
    assert {c: ktuberling.english_label(c) for c in cases} == cases


def test_wav_is_the_recording_resampled_to_16k(samples: dict) -> None:
    checked = Counter()
    for split in samples.values():
        for key, members in split.items():
            meta = json.loads(members["json"])
            source = soundtheme(meta["language"]).get(meta["concept"])
            assert ("wav" in members) == (source is not None and source.is_file()), key
            if source is None:
                continue
            ours, rate = soundfile.read(io.BytesIO(members["wav"]), dtype="float64")
            info = soundfile.info(io.BytesIO(members["wav"]))
            assert (rate, info.channels, info.subtype) == (16000, 1, "PCM_16"), key
            original, orig_rate = soundfile.read(str(source), dtype="float64", always_2d=True)
            g = gcd(16000, orig_rate)
            from scipy.signal import resample_poly

            reference = resample_poly(original.mean(axis=1), 16000 // g, orig_rate // g)
            assert abs(ours.size - reference.size) <= 1, key
            m = min(ours.size, reference.size)
            error = np.linalg.norm(ours[:m] - reference[:m]) / np.linalg.norm(reference[:m])
            assert error < 0.1, f"{key}: relative error {error:.3f} against scipy's resample_poly"
            assert meta["duration_s"] == pytest.approx(ours.size / 16000, abs=1e-3)
            checked[meta["language"]] += 1
    assert checked["en"] and checked["fr"], checked
    assert any("wav" not in m for split in samples.values() for m in split.values())  # image + text only samples


def test_the_framework_audio_decoder_reads_the_wav(samples: dict) -> None:
    from mmssl.architectures.modalities.audio import read_waveform

    members = next(m for split in samples.values() for m in split.values() if "wav" in m)
    x, rate = read_waveform(members["wav"])
    reference, _ = soundfile.read(io.BytesIO(members["wav"]), dtype="float64")
    assert rate == 16000
    np.testing.assert_allclose(x, reference, atol=1e-4)


def test_split_is_disjoint_and_follows_the_documented_policy(samples: dict) -> None:
    expected = expected_splits(theme_objects())
    pictures = {}
    for split, members in samples.items():
        pictures[split] = set()
        for m in members.values():
            meta = json.loads(m["json"])
            name = f"{meta['theme']}/{meta['object']}"
            assert expected[name] == split, name
            pictures[split].add(name)
    assert not set(samples["train"]) & set(samples["test"])
    assert not pictures["train"] & pictures["test"]
    assert pictures["train"] and pictures["test"]
    for split, members in samples.items():  # every picture of the split comes in every language
        langs = Counter(json.loads(m["json"])["language"] for m in members.values())
        assert set(langs) == set(LANGUAGES) and len(set(langs.values())) == 1, (split, langs)


def test_index_counts_match_the_tars(built: tuple[Path, dict[str, DatasetIndex]], samples: dict) -> None:
    out, indexes = built
    for split in ("train", "test"):
        index = DatasetIndex.load(out / split)
        assert index == indexes[split]
        assert index.total_samples == len(samples[split])
        members = Counter(ext for m in samples[split].values() for ext in m)
        assert index.modalities == dict(members)
        for shard in index.shards:
            with tarfile.open(out / split / shard.path) as tar:
                assert len({n.name.split(".")[0] for n in tar.getmembers()}) == shard.samples
            assert (out / split / shard.path).stat().st_size == shard.bytes
        info = index.info
        assert info["split"] == split and info["label_field"] == "label" and "GPL-2+" in info["license"]
        assert info["counts"]["pictures"] == len(theme_objects())
        assert info["counts"]["concepts"] == len(set(theme_objects().values()))
        assert info["counts"]["recordings"]["en"] == len(set(soundtheme("en")) & set(theme_objects().values()))
        assert info["samples_with_audio"] == members["wav"]
    assert len(indexes["train"].shards) > 1  # shard_size=5 forces several shards


def test_building_twice_gives_identical_indexes_and_members(built: tuple[Path, dict], samples: dict,
                                                             tmp_path: Path) -> None:
    out, _ = built
    ktuberling.build(tmp_path, image_size=IMAGE_SIZE, languages=LANGUAGES, limit=LIMIT, shard_size=5)
    for split in ("train", "test"):
        assert (tmp_path / split / "index.json").read_text() == (out / split / "index.json").read_text()
        assert read_split(tmp_path / split) == samples[split]


def test_unknown_language_and_missing_install_are_named(tmp_path: Path) -> None:
    _require_installed()
    with pytest.raises(DataError, match=r"languages: .*'xx'"):
        ktuberling.build(tmp_path, languages=("xx",), limit=1)
    with pytest.raises(DataError, match="apt-get install -y --no-install-recommends ktuberling-data librsvg2-bin"):
        ktuberling.build(tmp_path, root=tmp_path / "absent")


def _toy_root(root: Path) -> None:
    """A fake package: a 40x20 red and a 10x30 blue rectangle (one concept: one picture per split), an invisible
    sprite and a missing id (another concept), duplicates; a 441 Hz sine at 44.1 kHz, an undecodable recording, a
    listed file that does not exist."""
    (root / "pics").mkdir(parents=True)
    (root / "sounds" / "en").mkdir(parents=True)
    (root / "pics" / "toy.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
        '<rect id="red" x="10" y="10" width="40" height="20" fill="#ff0000"/>'
        '<rect id="blue" x="70" y="5" width="10" height="30" fill="#0000ff"/>'
        '<rect id="ghost" x="60" y="60" width="10" height="10" fill="#00ff00" fill-opacity="0"/></svg>')
    (root / "pics" / "toy.theme").write_text(
        '<playground gameboard="toy.svg"><object name="red" sound="toy_box"/><object name="blue" sound="toy_box"/>'
        '<object name="ghost" sound="toy_cup"/>'
        '<object name="gone" sound="toy_cup"/><object name="red" sound="toy_box"/>'
        '<object name="red" sound="toy_box"/></playground>')
    t = np.arange(44100) / 44100
    soundfile.write(root / "sounds" / "en" / "box.wav", 0.5 * np.sin(2 * np.pi * 441 * t), 44100, subtype="FLOAT")
    (root / "sounds" / "en" / "cup.ogg").write_bytes(b"not an ogg file")
    (root / "sounds" / "en.soundtheme").write_text(
        '<language code="en"><sound name="toy_box" file="en/box.wav"/><sound name="toy_cup" file="en/cup.ogg"/>'
        '<sound name="toy_hat" file="en/hat.ogg"/></language>')


def test_broken_sprites_and_recordings_are_skipped_and_counted(tmp_path: Path) -> None:
    _require_installed()
    _toy_root(tmp_path / "root")
    indexes = ktuberling.build(tmp_path / "out", image_size=IMAGE_SIZE, root=tmp_path / "root")
    info = indexes["train"].info
    assert info["skipped"] == {"duplicate_object": 2, "broken_sprite": 2, "broken_recording": 1}
    assert info["counts"]["listed_recordings_missing"] == {"en": 1}
    examples = " | ".join(info["skipped_examples"])
    assert "toy.svg#ghost" in examples and "toy.svg#gone" in examples and "cup.ogg" in examples
    members = {**read_split(tmp_path / "out" / "train"), **read_split(tmp_path / "out" / "test")}
    assert sorted(members) == ["toy__blue__en", "toy__red__en"]
    assert {indexes["train"].total_samples, indexes["test"].total_samples} == {1}
    blue = np.asarray(Image.open(io.BytesIO(members["toy__blue__en"]["png"])))
    cols = np.flatnonzero(((blue[..., 2] > 200) & (blue[..., 0] < 60)).any(axis=0))
    assert abs(cols.size - IMAGE_SIZE / 3) <= 1.5 and abs(cols.mean() - (IMAGE_SIZE - 1) / 2) <= 1  # 1:3, centred
    sample = members["toy__red__en"]
    # the 2:1 rectangle fills the width and is centred vertically on white
    pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    rows, cols = np.flatnonzero(red.any(axis=1)), np.flatnonzero(red.any(axis=0))
    assert (cols[0], cols[-1]) == (0, IMAGE_SIZE - 1)
    assert abs(rows[0] - IMAGE_SIZE // 4) <= 1 and abs(rows[-1] - (3 * IMAGE_SIZE // 4 - 1)) <= 1
    assert (pixels[0] == 255).all() and (pixels[-1] == 255).all()
    # a periodic sine resamples exactly: 441 Hz at 16 kHz for 1 s, within 16-bit quantisation
    wav, rate = soundfile.read(io.BytesIO(sample["wav"]), dtype="float64")
    assert rate == 16000 and wav.size == 16000
    np.testing.assert_allclose(wav, 0.5 * np.sin(2 * np.pi * 441 * np.arange(16000) / 16000), atol=2e-4)
