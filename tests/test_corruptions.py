"""Robustness corruptions: the array functions (`architectures.modalities.corruptions`) and every plug-in's
``corrupted_decoder`` on real encoded bytes (a PNG written by PIL, a WAV by the stdlib ``wave`` module, UTF-8 text, a
``.npy`` series, an animated GIF)."""

from __future__ import annotations

import io
import math
import pickle
import tarfile
import wave
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mmssl.architectures.errors import ArchitectureError
from mmssl.architectures.modalities import MODALITIES, AudioConfig, ImageConfig, TextConfig, get_modality
from mmssl.architectures.modalities import corruptions as C
from mmssl.architectures.modalities.audio import LogMel, noise_snr_db, read_waveform
from mmssl.architectures.modalities.sequence import SequenceConfig
from mmssl.architectures.modalities.video import VideoConfig
from mmssl.data_pipelines.stream import read_once

SENTENCE = "please enter your password followed by the pound key thank you for calling"
RATE = 8000


def png_bytes(seed: int = 0, size: tuple[int, int] = (40, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(seconds: float = 1.0) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    x = 0.5 * np.sin(2 * np.pi * 440 * t + 0.3) + 0.2 * np.sin(2 * np.pi * 1234 * t + 1.0)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def npy_bytes(steps: int = 80, channels: int = 3) -> bytes:
    x = np.random.default_rng(1).normal(size=(steps, channels)) * np.array([1.0, 3.0, 0.5]) + np.array([0, 5, -2])
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def gif_bytes(n: int = 10, side: int = 24) -> bytes:
    rng = np.random.default_rng(2)
    frames = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), mode="RGB") for _ in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, spm: Path) -> dict[str, tuple[Any, bytes]]:
    """modality -> (config, member bytes)."""
    return {
        "image": (ImageConfig(image_size=32, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3]), png_bytes()),
        "audio": (AudioConfig(sample_rate=RATE, n_mels=32, frames=64), wav_bytes()),
        "text": (TextConfig(tokenizer=str(spm), max_len=24), SENTENCE.encode()),
        "sequence": (SequenceConfig(channels=3, length=64, patch_len=8), npy_bytes()),
        "video": (VideoConfig(frames=8, image_size=16), gif_bytes()),
    }


CASES = [(m, k) for m in ("image", "audio", "text", "sequence", "video") for k in MODALITIES[m].corruptions]
RANDOM_CASES = [(m, k) for m, k in CASES if k != "blur"]


def decode(inputs: dict[str, tuple[Any, bytes]], modality: str, kind: str | None, level: float, seed: int) -> Any:
    cfg, data = inputs[modality]
    plugin = get_modality(modality)
    decoder = plugin.decoder(cfg, train=False) if kind is None else plugin.corrupted_decoder(cfg, kind, level)
    return decoder(data, np.random.default_rng(seed))


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def test_every_plugin_declares_the_brief_kinds() -> None:
    assert {m: set(p.corruptions) for m, p in MODALITIES.items() if p.corruptions} == {
        "image": {"blur", "occlusion", "noise"}, "text": {"token_drop", "typos"}, "audio": {"noise", "gaps"},
        "sequence": {"gaps", "noise"}, "video": {"frame_drop", "blur"}}


@pytest.mark.parametrize(("modality", "kind"), CASES)
def test_level_zero_is_the_clean_decoder_and_positive_levels_corrupt(inputs: dict, modality: str, kind: str) -> None:
    clean = decode(inputs, modality, None, 0.0, seed=5)
    assert same(decode(inputs, modality, kind, 0.0, seed=5), clean)
    assert not same(decode(inputs, modality, kind, 0.5, seed=5), clean)


@pytest.mark.parametrize(("modality", "kind"), CASES)
def test_corrupted_decoders_are_deterministic_and_picklable(inputs: dict, modality: str, kind: str) -> None:
    cfg, data = inputs[modality]
    decoder = get_modality(modality).corrupted_decoder(cfg, kind, 0.6)
    first = decoder(data, np.random.default_rng(11))
    assert same(decoder(data, np.random.default_rng(11)), first)
    assert same(pickle.loads(pickle.dumps(decoder))(data, np.random.default_rng(11)), first)  # loader workers
    if (modality, kind) in RANDOM_CASES:
        assert not same(decoder(data, np.random.default_rng(12)), first)


def test_stream_seeds_corruption_per_sample_key(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"k{i}.png")
            data = png_bytes(seed=0)  # the same picture under three keys
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    decoder = get_modality("image").corrupted_decoder(ImageConfig(), "noise", 0.3)

    def run() -> torch.Tensor:
        batches = list(read_once([str(shard)], fields={"image": ["png"]}, decoders={"image": decoder}, batch_size=3))
        return batches[0].inputs["image"]

    x = run()
    assert torch.equal(run(), x)  # reproducible
    assert not torch.equal(x[0], x[1]) and not torch.equal(x[1], x[2])  # a different draw per key


@pytest.mark.parametrize("modality", ["image", "audio", "text", "sequence", "video"])
def test_bad_kind_or_level_names_it_and_the_supported_list(inputs: dict, modality: str) -> None:
    cfg, _ = inputs[modality]
    plugin = get_modality(modality)
    with pytest.raises(ArchitectureError, match=r"'bogus'.*" + plugin.corruptions[0]):
        plugin.corrupted_decoder(cfg, "bogus", 0.5)
    for level in (-0.1, 1.5, math.nan, "high"):
        with pytest.raises(ArchitectureError, match=rf"must be in \[0, 1\], got {level!r}.*{plugin.corruptions[0]}"):
            plugin.corrupted_decoder(cfg, plugin.corruptions[0], level)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------- images


def pixels(inputs: dict, x: torch.Tensor) -> torch.Tensor:
    cfg = inputs["image"][0]
    return x * torch.tensor(cfg.std).view(-1, 1, 1) + torch.tensor(cfg.mean).view(-1, 1, 1)


@pytest.mark.parametrize("level", [0.05, 0.3, 0.77, 1.0])
def test_image_occlusion_covers_the_level_of_the_area(inputs: dict, level: float) -> None:
    clean = decode(inputs, "image", None, 0, seed=0)
    assert not bool((clean == 0).all(0).any())
    for seed in range(5):
        x = decode(inputs, "image", "occlusion", level, seed)
        hole = (x == 0).all(0)  # filled with the mean: exactly 0 after normalisation
        assert abs(int(hole.sum()) - level * 32 * 32) <= 32  # within one pixel row / column
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert int(hole.sum()) == len(rows) * len(cols)  # one rectangle
        assert torch.equal(x[:, ~hole], clean[:, ~hole])


def test_occlusion_box_area_property() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w, f = int(rng.integers(1, 60)), int(rng.integers(1, 60)), float(rng.random())
        top, left, bh, bw = C.occlusion_box(h, w, f, rng)
        assert top >= 0 and top + bh <= h and left >= 0 and left + bw <= w
        assert abs(bh * bw - f * h * w) <= max(h, w)


def test_image_noise_std_equals_level_in_pixel_units(inputs: dict) -> None:
    clean = pixels(inputs, decode(inputs, "image", None, 0, seed=0))
    for level in (0.1, 0.5, 1.0):
        added = pixels(inputs, decode(inputs, "image", "noise", level, seed=3)) - clean
        assert abs(float(added.std()) / level - 1) < 0.06 and abs(float(added.mean())) < 0.1 * level


def high_frequency_energy(x: torch.Tensor) -> float:
    spec = torch.fft.fft2(x.double()).abs().pow(2)
    f = torch.fft.fftfreq(x.shape[-1]).abs()
    high = (f[:, None] >= 0.25) | (f[None, :] >= 0.25)
    return float(spec[..., high].sum())


def test_image_blur_is_the_gaussian_of_the_resized_pixels_and_monotone(inputs: dict) -> None:
    clean = pixels(inputs, decode(inputs, "image", None, 0, seed=0))
    blurred = pixels(inputs, decode(inputs, "image", "blur", 0.5, seed=0))
    torch.testing.assert_close(blurred, C.gaussian_blur(clean, 0.1 * 0.5 * 32), atol=1e-5, rtol=0)
    energies = [high_frequency_energy(pixels(inputs, decode(inputs, "image", "blur", lv, 0)) - 0.5)
                for lv in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)]
    assert all(b < a for a, b in pairwise(energies)), energies
    assert energies[-1] < 0.01 * energies[0]


def test_gaussian_kernel_matches_formula_and_blur_keeps_constants() -> None:
    k = C.gaussian_kernel(1.5)
    d = torch.arange(-5, 6, dtype=torch.float64)
    ref = torch.exp(-d * d / 4.5)
    torch.testing.assert_close(k.double(), ref / ref.sum(), atol=1e-7, rtol=0)
    flat = torch.full((3, 9, 7), 0.3)
    torch.testing.assert_close(C.gaussian_blur(flat, 20.0), flat)  # kernel wider than the image: replicated edges


# ----------------------------------------------------------------------------------------------------------- audio


class Recorder:
    """Wraps a waveform corruption and keeps what it saw and returned."""

    def __init__(self, fn: C.Bound) -> None:
        self.fn, self.seen, self.made = fn, [], []

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        out = self.fn(x, rng)
        self.seen.append(x)
        self.made.append(out)
        return out


@pytest.mark.parametrize("level", [0.1, 0.5, 1.0])
def test_audio_noise_reaches_the_stated_snr_on_the_real_waveform(inputs: dict, level: float) -> None:
    cfg, data = inputs["audio"]
    plugin_decoder = get_modality("audio").corrupted_decoder(cfg, "noise", level)
    rec = Recorder(plugin_decoder.corrupt)
    out = LogMel(cfg, train=False, corrupt=rec)(data, np.random.default_rng(4))
    assert torch.equal(out, plugin_decoder(data, np.random.default_rng(4)))
    samples, _ = read_waveform(data)
    assert rec.seen[0].numel() == samples.size == RATE  # the real samples only: padding is not noised
    torch.testing.assert_close(rec.seen[0], torch.from_numpy(samples))
    assert noise_snr_db(level) == pytest.approx(40 - 50 * level)
    assert abs(C.snr_db(rec.seen[0], rec.made[0] - rec.seen[0]) - noise_snr_db(level)) < 0.5


@pytest.mark.parametrize("level", [0.1, 0.35, 0.8])
def test_audio_gaps_zero_the_level_of_the_waveform_in_50ms_chunks(inputs: dict, level: float) -> None:
    cfg, data = inputs["audio"]
    rec = Recorder(get_modality("audio").corrupted_decoder(cfg, "gaps", level).corrupt)
    LogMel(cfg, train=False, corrupt=rec)(data, np.random.default_rng(6))
    x, y = rec.seen[0].view(-1, 400), rec.made[0].view(-1, 400)  # the 50 ms grid: 20 chunks
    gap = (y == 0).all(1)
    assert torch.equal(y[~gap], x[~gap]) and int(gap.sum()) == round(level * 20)


# ------------------------------------------------------------------------------------------------------------ text


def test_drop_words_rate_is_binomial_and_keeps_order() -> None:
    rng = np.random.default_rng(0)
    words = SENTENCE.split()
    for p in (0.1, 0.5, 0.9):
        kept = 0
        for _ in range(300):
            out = C.drop_words(SENTENCE, p, rng).split()
            it = iter(words)
            assert all(w in it for w in out)  # a subsequence
            kept += len(out)
        n = 300 * len(words)
        assert abs((n - kept) / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_keyboard_map_is_symmetric_and_staggered() -> None:
    nb = C.NEIGHBOURS
    assert set(nb["s"]) == set("adwezx") and set(nb["g"]) == set("fhtyvb") and set(nb["q"]) == set("12wa")
    assert all(a in nb[b] for a in nb for b in nb[a])


def osa_distance(a: str, b: str) -> int:
    """Optimal-string-alignment edit distance (insert, delete, substitute, adjacent transposition)."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def test_typo_rate_matches_the_level() -> None:
    text = "The quick brown fox jumps over 13 lazy dogs"
    keys = sum(c.lower() in C.NEIGHBOURS for c in text)
    n = 400 * keys
    rng = np.random.default_rng(1)
    for p in (0.05, 0.3):
        tol = 4 * math.sqrt(p * (1 - p) / n)
        subs = [C.keyboard_typos(text, p, rng, ops=("substitute",)) for _ in range(400)]
        changed = [(a, b) for s in subs for a, b in zip(text, s, strict=True) if a != b]
        assert abs(len(changed) / n - p) < tol
        assert all(b.lower() in C.NEIGHBOURS[a.lower()] and b == (b.upper() if a.isupper() else b.lower())
                   for a, b in changed)  # a neighbour key, case kept
        lost = sum(len(text) - len(C.keyboard_typos(text, p, rng, ops=("delete",))) for _ in range(400))
        assert abs(lost / n - p) < tol
        edits = sum(osa_distance(text, C.keyboard_typos(text, p, rng)) for _ in range(400))
        # every typo is one OSA edit; a swap consumes the next key (it is not drawn again), so slightly fewer
        assert p * (1 - p / 3) - tol < edits / n < p + tol


def test_text_corruption_acts_on_the_string_before_tokenisation(inputs: dict) -> None:
    cfg, data = inputs["text"]
    tok = get_modality("text").tokenizer(cfg)
    for kind, fn in (("token_drop", C.drop_words), ("typos", C.keyboard_typos)):
        got = get_modality("text").corrupted_decoder(cfg, kind, 0.4)(data, np.random.default_rng(9))
        want = tok.encode(fn(SENTENCE, 0.4, np.random.default_rng(9)))
        assert same(got, want)


# ---------------------------------------------------------------------------------------------- sequence and video


def test_sequence_gaps_fill_whole_steps_with_the_missing_value(inputs: dict) -> None:
    clean = decode(inputs, "sequence", None, 0, seed=0)
    for level in (0.25, 0.6):
        out = decode(inputs, "sequence", "gaps", level, seed=2)
        hit = (out["values"] != clean["values"]).any(1)
        assert int(hit.sum()) == round(level * 64) and bool((out["values"][hit] == 0).all())
        assert torch.equal(out["mask"], clean["mask"])
    cfg = SequenceConfig(channels=5, layout="features")
    row = io.BytesIO()
    np.save(row, np.arange(1.0, 6.0))
    out = get_modality("sequence").corrupted_decoder(cfg, "gaps", 0.4)(row.getvalue(), np.random.default_rng(0))
    assert int((out["values"] == 0).sum()) == 2  # 40 % of the row's 5 features


def test_sequence_noise_is_scaled_by_each_channels_std(inputs: dict) -> None:
    clean = decode(inputs, "sequence", None, 0, seed=0)["values"].double()
    out = decode(inputs, "sequence", "noise", 0.7, seed=3)["values"].double()
    sigma = clean.std(0, correction=0)  # the channels' spreads differ (1, 3, 0.5)
    eps = np.random.default_rng(3).standard_normal((64, 3))
    torch.testing.assert_close((out - clean) / sigma, 0.7 * torch.from_numpy(eps), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("level", [0.3, 0.5, 1.0])
def test_video_frame_drop_repeats_the_last_kept_frame(inputs: dict, level: float) -> None:
    clean = decode(inputs, "video", None, 0, seed=0)  # [C, T, H, W], 8 distinct frames
    out = decode(inputs, "video", "frame_drop", level, seed=int(level * 10))
    repeats = [t for t in range(1, 8) if torch.equal(out[:, t], out[:, t - 1])]
    assert len(repeats) == round(level * 7)
    last = 0
    for t in range(8):
        last = last if t in repeats else t
        assert torch.equal(out[:, t], clean[:, last])


def test_video_blur_blurs_every_frame_like_an_image(inputs: dict) -> None:
    cfg = inputs["video"][0]
    clean = decode(inputs, "video", None, 0, seed=0) * 0.5 + 0.5  # mean = std = 0.5
    out = decode(inputs, "video", "blur", 0.8, seed=0) * 0.5 + 0.5
    want = C.gaussian_blur(clean.transpose(0, 1), 0.1 * 0.8 * cfg.image_size).transpose(0, 1)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_array_functions_are_identity_at_strength_zero() -> None:
    rng = np.random.default_rng(0)
    x = torch.rand(4, 3, 8, 8)
    for fn in (C.gaussian_blur, C.occlude, C.add_gaussian_noise, C.drop_frames, C.zero_slices, C.add_channel_noise):
        assert torch.equal(fn(x, 0.0, rng), x)
    assert torch.equal(C.zero_chunks(x.flatten(), 0.0, rng, chunk=10), x.flatten())
    assert C.drop_words(" a  b ", 0.0, rng) == " a  b " and C.keyboard_typos("abc", 0.0, rng) == "abc"
