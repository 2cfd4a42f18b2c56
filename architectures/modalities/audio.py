"""Audio: a waveform -> log-mel spectrogram -> patches into a timm ViT (the AST / CLAP audio-tower recipe).

Preprocessing (per sample, in loader workers):

1. decode the member (WAV PCM via the standard library; FLAC/OGG via ``soundfile`` when installed), mix to mono,
   resample to ``sample_rate`` (band-limited, by FFT); when training, optionally change speed by a random factor
   in ``speed_perturb`` (resampling, so pitch and tempo move together, Ko et al. 2015) and gain by up to
   ``gain_db``;
2. crop or zero-pad to ``hop_length·(frames-1)`` samples (crop from the start, or at a random offset when
   ``crop="random"`` and training);
3. power spectrogram ``|STFT|²`` (Hann window ``n_fft``, hop ``hop_length``, centred) -> ``n_mels`` triangular
   HTK-mel filters between ``f_min`` and ``f_max`` (``mel(f) = 2595·log10(1 + f/700)``) -> ``log(x + 1e-6)``;
4. normalise ``(x - norm_mean) / norm_std``; when training with ``spec_augment``, zero two frequency bands of up
   to ``freq_mask`` bins and two time spans of up to ``time_mask`` frames (SpecAugment, Park et al. 2019).

The result is a ``[1, n_mels, frames]`` image that a ViT cuts into ``patch_size`` patches.

Corruptions (robustness evaluation, `AudioPlugin.corrupted_decoder`), applied to the real (not zero-padded) samples of
the waveform after step 2, before the spectrogram, at ``level ∈ (0, 1]`` (level 0 is the clean decoder):

* ``noise``: white Gaussian noise at ``SNR = 40·(1 - level) - 10·level`` dB (40 dB, barely audible, down to -10 dB,
  noise 10x the signal power);
* ``gaps``: ``level`` of the waveform zeroed in randomly chosen 50 ms chunks (dropouts).
"""

from __future__ import annotations

import io
import wave
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mmssl.architectures.embedders import PatchEmbedder
from mmssl.architectures.modalities import corruptions
from mmssl.architectures.modalities.base import DecoderFn, MaskedView, ModalityPlugin, TowerConfig, timm_tower
from mmssl.architectures.modalities.image import vit_masked_view
from mmssl.architectures.modalities.masking import (
    Generators,
    block_mask,
    patchify,
    random_token_mask,
    time_span_mask,
)
from mmssl.architectures.towers import ArchitectureError, TimmTower, Tower


@dataclass
class AudioConfig(TowerConfig):
    arch: str = "vit_tiny_patch16_224"
    pool: str = "avg"
    sample_rate: int = 8000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 64
    frames: int = 256
    f_min: float = 0.0
    f_max: float | None = None
    patch_size: list[int] = field(default_factory=lambda: [16, 16])
    norm_mean: float = -6.0
    norm_std: float = 4.0
    crop: str = "start"
    speed_perturb: list[float] = field(default_factory=list)  # e.g. [0.9, 1.1]: resample by a random factor
    gain_db: float = 0.0  # random gain in [-gain_db, +gain_db] dB
    spec_augment: bool = False
    freq_mask: int = 8
    time_mask: int = 24


def read_waveform(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate."""
    if data[:4] == b"RIFF":
        with wave.open(io.BytesIO(data)) as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
        if width == 1:
            x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
        elif width in (2, 4):
            dtype = np.int16 if width == 2 else np.int32
            x = np.frombuffer(raw, dtype).astype(np.float32) / float(np.iinfo(dtype).max)
        elif width == 3:
            b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
            v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
            x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
        else:
            raise ValueError(f"unsupported WAV sample width {width}")
        return x.reshape(-1, channels).mean(axis=1), rate
    try:
        import soundfile
    except ImportError:
        raise ValueError("not a WAV file, and `soundfile` is not installed to read other formats") from None
    x, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return x.mean(axis=1), int(rate)


def resample(x: Tensor, orig: int, new: int) -> Tensor:
    """Band-limited resampling by truncating / zero-padding the spectrum (exact for periodic signals)."""
    if orig == new or x.numel() == 0:
        return x
    n_out = max(1, round(x.numel() * new / orig))
    spec = torch.fft.rfft(x)
    keep = min(spec.numel(), n_out // 2 + 1)
    out = torch.zeros(n_out // 2 + 1, dtype=spec.dtype)
    out[:keep] = spec[:keep]
    return torch.fft.irfft(out, n=n_out) * (n_out / x.numel())


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float, f_max: float) -> Tensor:
    """``[n_fft//2 + 1, n_mels]`` triangular filters equally spaced on the HTK mel scale."""

    def mel(f: np.ndarray | float) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(f_min), mel(f_max), n_mels + 2))
    freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    lower = (freqs[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])[None, :]
    upper = (edges[None, 2:] - freqs[:, None]) / (edges[2:] - edges[1:-1])[None, :]
    return torch.from_numpy(np.maximum(0.0, np.minimum(lower, upper))).float()


WaveCorruption = Callable[[Tensor, np.random.Generator], Tensor]
SNR_CLEAN_DB, SNR_NOISY_DB = 40.0, -10.0  # the noise corruption's SNR at levels 0+ and 1
GAP_SECONDS = 0.05


def noise_snr_db(level: float) -> float:
    """The ``noise`` corruption's SNR: ``40·(1 - level) - 10·level`` dB."""
    return SNR_CLEAN_DB * (1.0 - level) + SNR_NOISY_DB * level


class LogMel:
    """Waveform -> normalised log-mel ``[1, n_mels, frames]`` (see the module docstring); ``corrupt`` (evaluation
    corruptions) acts on the real samples of the cropped waveform."""

    def __init__(self, cfg: AudioConfig, train: bool, corrupt: WaveCorruption | None = None) -> None:
        if cfg.crop not in ("start", "random"):
            raise ArchitectureError(f"audio crop must be 'start' or 'random', got {cfg.crop!r}")
        self.cfg = cfg
        self.train = train
        self.corrupt = corrupt
        self.window = torch.hann_window(cfg.n_fft)
        f_max = cfg.f_max if cfg.f_max is not None else cfg.sample_rate / 2
        self.filters = mel_filterbank(cfg.n_fft, cfg.n_mels, cfg.sample_rate, cfg.f_min, f_max)
        self.clip = cfg.hop_length * (cfg.frames - 1)

    def waveform(self, x: Tensor, rng: np.random.Generator) -> Tensor:
        if x.numel() > self.clip:
            start = int(rng.integers(0, x.numel() - self.clip + 1)) if self.train and self.cfg.crop == "random" else 0
            return x[start : start + self.clip]
        return torch.nn.functional.pad(x, (0, self.clip - x.numel()))

    def __call__(self, data: bytes, rng: np.random.Generator) -> Tensor:
        cfg = self.cfg
        samples, rate = read_waveform(data)
        x = resample(torch.from_numpy(np.ascontiguousarray(samples)), rate, cfg.sample_rate)
        if self.train and cfg.speed_perturb:
            factor = float(rng.uniform(cfg.speed_perturb[0], cfg.speed_perturb[-1]))
            x = resample(x, round(cfg.sample_rate * factor), cfg.sample_rate)
        if self.train and cfg.gain_db:
            x = x * 10 ** (float(rng.uniform(-cfg.gain_db, cfg.gain_db)) / 20)
        real = min(x.numel(), self.clip)
        x = self.waveform(x, rng)
        if self.corrupt is not None:
            x = torch.cat([self.corrupt(x[:real], rng), x[real:]])
        spec = torch.stft(x, cfg.n_fft, cfg.hop_length, window=self.window, center=True, return_complex=True)
        mel = torch.log(self.filters.T @ spec.abs().pow(2) + 1e-6)
        mel = (mel - cfg.norm_mean) / cfg.norm_std
        if self.train and cfg.spec_augment:
            mel = spec_augment(mel, rng, cfg.freq_mask, cfg.time_mask)
        return mel.unsqueeze(0).contiguous()


def spec_augment(mel: Tensor, rng: np.random.Generator, freq_mask: int, time_mask: int, n_masks: int = 2) -> Tensor:
    mel = mel.clone()
    n_mels, frames = mel.shape
    for size, length, dim in ((freq_mask, n_mels, 0), (time_mask, frames, 1)):
        for _ in range(n_masks):
            width = int(rng.integers(0, min(size, length) + 1))
            start = int(rng.integers(0, length - width + 1))
            if dim == 0:
                mel[start : start + width, :] = 0.0
            else:
                mel[:, start : start + width] = 0.0
    return mel


def _patch(cfg: AudioConfig) -> tuple[int, int]:
    size = [cfg.patch_size] if isinstance(cfg.patch_size, int) else list(cfg.patch_size)
    if len(size) == 1:
        size = size * 2
    if len(size) != 2:
        raise ArchitectureError(f"model.audio.patch_size must be [height, width], got {cfg.patch_size!r}")
    return int(size[0]), int(size[1])


class AudioPlugin(ModalityPlugin):
    name = "audio"
    config_cls = AudioConfig
    extensions = ("wav", "flac", "ogg", "mp3")
    corruptions = ("noise", "gaps")

    def decoder(self, cfg: AudioConfig, *, train: bool) -> DecoderFn:
        return LogMel(cfg, train)

    def build_corrupted_decoder(self, cfg: AudioConfig, kind: str, level: float) -> LogMel:
        """The evaluation decoder with ``kind`` at ``level`` applied to the waveform (module docstring)."""
        if kind == "noise":
            corrupt = corruptions.Bound(corruptions.add_noise_at_snr, noise_snr_db(level))
        else:
            chunk = max(1, round(GAP_SECONDS * cfg.sample_rate))
            corrupt = corruptions.Bound(corruptions.zero_chunks, level, {"chunk": chunk})
        return LogMel(cfg, train=False, corrupt=corrupt)

    def build_tower(self, cfg: AudioConfig) -> TimmTower:
        return timm_tower(cfg, in_chans=1, img_size=[cfg.n_mels, cfg.frames], patch_size=list(cfg.patch_size),
                          where="model.audio")

    def build_embedder(self, cfg: AudioConfig, width: int) -> PatchEmbedder:
        return PatchEmbedder(1, (cfg.n_mels, cfg.frames), _patch(cfg), width)

    def mask_kinds(self, cfg: AudioConfig) -> tuple[str, ...]:
        return ("random", "span", "block")

    def mask(self, cfg: AudioConfig, x: Tensor, ratio: float, generator: Generators = None, *,
             kind: str | None = None, span_length: int = 1) -> Tensor:
        """Over the ``(mels/ph) x (frames/pw)`` spectrogram patches: ``random``, MAE's uniform masking of exactly
        ``⌊ratio·N + ½⌋`` per row (AudioMAE, CAV-MAE); ``span``, whole time columns in spans of ``span_length``
        columns, ``⌊ratio·columns + ½⌋`` starts (AV-HuBERT's audio masking, HuBERT's spans over frames); ``block``,
        BEiT's blockwise masking."""
        kind = self.check_mask_kind(cfg, kind)
        ph, pw = _patch(cfg)
        grid = (x.shape[-2] // ph, x.shape[-1] // pw)
        if kind == "span":
            return time_span_mask(x.shape[0], grid, start_prob=ratio, span=span_length, generator=generator,
                                  device=x.device)
        if kind == "block":
            return block_mask(x.shape[0], grid, ratio, generator, device=x.device)
        return random_token_mask(x.shape[0], grid[0] * grid[1], ratio, generator, device=x.device)

    def target(self, cfg: AudioConfig, x: Tensor) -> Tensor:
        """The spectrogram patches ``[B, N, ph·pw]`` (`patchify` order, the embedder's token order)."""
        return patchify(x, _patch(cfg))

    def masked_view(self, cfg: AudioConfig, tower: Tower) -> MaskedView | None:
        """A timm ViT encodes the ``(mels/ph, frames/pw)`` patch grid (`TimmTower`'s masked forward)."""
        ph, pw = _patch(cfg)
        return vit_masked_view("audio", tower, (1, ph, pw), (cfg.n_mels // ph, cfg.frames // pw))

    def random_example(self, cfg: AudioConfig, batch_size: int) -> Tensor:
        return torch.randn(batch_size, 1, cfg.n_mels, cfg.frames)
