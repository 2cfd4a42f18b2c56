"""`mmssl evaluate` over a whole exported model on the real Asterisk shards: each number it reports equals an
independent computation on the same cached features (scikit-learn's LogisticRegression for the probe, brute-force
recall, the modality-gap formula, the missing-modality features for removal), and bad inputs fail by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from mmssl.architectures.config import ModelConfig, build_model
from mmssl.architectures.modalities import AudioConfig, TextConfig
from mmssl.tools.evaluation.evaluate import evaluate
from mmssl.tools.evaluation.features import Corruption, extract_model_features
from mmssl.tools.evaluation.report import compare, format_evaluation
from mmssl.tools.export.model import load_model, save_model
from tests.conftest import mmssl_in_process

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = ModelConfig(embed_dim=16, towers={
        "audio": AudioConfig(arch="resnet10t", model_args={"channels": [8, 16, 16, 16]}, frames=64, n_mels=32,
                             hop_length=160, norm_mean=-10.0, norm_std=5.0),
        "text": TextConfig(tokenizer=str(asterisk_data / "spm.model"), width=32, depth=1, heads=2, max_len=16),
    })
    return save_model(tmp_path_factory.mktemp("export") / "model", cfg, build_model(cfg, seed=7))


@pytest.fixture(scope="module")
def results(model_dir: Path, asterisk_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("eval")
    return evaluate(model_dir, shards=str(asterisk_data / "train"), test_shards=str(asterisk_data / "test"),
                    label="family", out_dir=out, match_field="text", levels=(0.0, 0.5, 1.0))


def _labelled(feats: object, rows_mask: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    rows = [i for i in range(len(feats.keys)) if rows_mask[i] and feats.meta["family"][i] is not None]
    return torch.tensor(rows), [feats.meta["family"][i] for i in rows]


def test_results_file_plots_and_table(results: dict) -> None:
    out = Path(results["results_file"])
    stored = json.loads(out.read_text())
    assert stored["family"] == "fusion_free" and set(stored["pretrained"]["probe"]) == {"audio", "text", "fused"}
    for name in ("probe", "retrieval", "robustness"):
        assert Path(results["plots"][name]).read_bytes()[:8] == PNG
    table = format_evaluation(results)
    assert "probe top-1 [fused]" in table and "robustness score" in table and "PID" in table


def test_probe_equals_sklearn_on_the_cached_features(results: dict, model_dir: Path, asterisk_data: Path) -> None:
    loaded = load_model(model_dir)
    train = extract_model_features(loaded, str(asterisk_data / "train"))  # the cache the evaluation wrote
    test = extract_model_features(loaded, str(asterisk_data / "test"))
    probe = results["pretrained"]["probe"]["audio"]
    tr_rows, tr_labels = _labelled(train, train.present["audio"])
    te_rows, te_labels = _labelled(test, test.present["audio"])
    x = train.pooled["audio"][tr_rows].double().numpy()
    mean, std = x.mean(0), x.std(0, ddof=1).clip(1e-8)
    clf = LogisticRegression(C=1.0 / (probe["best_l2"] * len(tr_labels)), max_iter=10000, tol=1e-10)
    clf.fit((x - mean) / std, tr_labels)
    xt = (test.pooled["audio"][te_rows].double().numpy() - mean) / std
    assert probe["top1"] == pytest.approx(float((clf.predict(xt) == np.array(te_labels)).mean()), abs=1.5 / 85)


def test_retrieval_and_gap_equal_brute_force(results: dict, model_dir: Path, asterisk_data: Path) -> None:
    test = extract_model_features(load_model(model_dir), str(asterisk_data / "test"))
    a = torch.nn.functional.normalize(test.embeddings["audio"].double(), dim=-1)
    t = torch.nn.functional.normalize(test.embeddings["text"].double(), dim=-1)
    texts = test.meta["text"]
    sims = a @ t.T
    hits = []
    for i in range(len(texts)):  # R@1 audio->text: is the best-scoring text a transcript equal to the query's?
        order = torch.argsort(-sims[i], stable=True)
        hits.append(texts[int(order[0])] == texts[i])
    entry = results["pretrained"]["retrieval"]["audio-text"]
    assert entry["audio->text"]["R@1"] == pytest.approx(float(np.mean(hits)))
    gap = results["pretrained"]["diagnostics"]["pairs"]["audio/text"]["gap"]
    assert gap == pytest.approx(float((a.mean(0) - t.mean(0)).norm()), abs=1e-6)


def test_robustness_level_zero_is_clean_and_removal_uses_missing_modality_features(
        results: dict, model_dir: Path, asterisk_data: Path) -> None:
    rob = results["robustness"]
    probes = results["pretrained"]["probe"]
    for name, values in rob["curves"]["probe:audio"].items():
        assert values[0] == pytest.approx(probes["audio"]["top1"]), name
    assert set(rob["curves"]["probe:audio"]) == {"audio:noise", "audio:gaps"}
    assert set(rob["curves"]["probe:text"]) == {"text:token_drop", "text:typos"}
    loaded = load_model(model_dir)
    removed = extract_model_features(loaded, str(asterisk_data / "test"), corruption=Corruption("audio", "removed"))
    clean = extract_model_features(loaded, str(asterisk_data / "test"))
    assert float(removed.fused[:, : clean.pooled["audio"].shape[1]].abs().max()) == 0.0  # audio half zeroed
    torch.testing.assert_close(removed.pooled["text"], clean.pooled["text"])
    without_audio = rob["removed"]["probe:fused"]["audio"]
    assert rob["removal_drop"]["audio"] == pytest.approx(probes["fused"]["top1"] - without_audio)
    assert 0.0 <= rob["score"]["score"] <= 1.0


def test_compare_lines_up_evaluations(results: dict, tmp_path: Path) -> None:
    runs = []
    for name in ("run_a", "run_b"):  # two runs' eval directories
        (tmp_path / name / "eval").mkdir(parents=True)
        (tmp_path / name / "eval" / "results.json").write_text(Path(results["results_file"]).read_text())
        runs.append(str(tmp_path / name))
    table, text = compare(runs, out=tmp_path)
    metric = "probe top-1 [audio]"
    assert list(table["metrics"][metric].values()) == [results["pretrained"]["probe"]["audio"]["top1"]] * 2
    assert metric in text and (tmp_path / "compare.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(("args", "message"), [
    (["--label", "colour"], "label field 'colour'"),
    (["--label", "family", "--pairs", "audio:image"], "no 'image' encoder"),
    (["--label", "family", "--levels", "0", "1.5"], "--levels must lie in [0, 1] (0 = clean), got 1.5"),
    (["--label", "family", "--rerank-k", "0"], "--rerank-k must be >= 1, got 0"),
])
def test_bad_inputs_fail_by_name(model_dir: Path, asterisk_data: Path, tmp_path: Path, args: list[str],
                                 message: str) -> None:
    proc = mmssl_in_process("evaluate", str(model_dir), "--shards", str(asterisk_data / "train"), "--test-shards",
                            str(asterisk_data / "test"), "--out", str(tmp_path), "--no-robustness", "--no-floor", *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_unified_model_fused_feature_is_the_query_fusion_state(asterisk_data: Path, tmp_path: Path) -> None:
    """Any family evaluates: a unified encoder's fused feature is its joint pass's state of the query's first
    token, and the fused probe and retrieval run on it."""
    from mmssl.architectures.config import UnifiedConfig
    from mmssl.data_pipelines.shards import resolve_shards
    from mmssl.data_pipelines.stream import read_once

    cfg = ModelConfig(family="unified", embed_dim=16,
                      unified=UnifiedConfig(width=32, depth=1, heads=2, fusion_depth=1, query="text"),
                      towers={"audio": AudioConfig(frames=64, n_mels=32, patch_size=[16, 16], hop_length=160),
                              "text": TextConfig(tokenizer=str(asterisk_data / "spm.model"), max_len=16)})
    model_dir = save_model(tmp_path / "model", cfg, build_model(cfg, seed=3))
    loaded = load_model(model_dir)
    feats = extract_model_features(loaded, str(asterisk_data / "test"), cache=False)
    batch = next(read_once(resolve_shards(str(asterisk_data / "test")), fields=loaded.fields(),
                           decoders=loaded.decoders(), batch_size=8))
    with torch.no_grad():
        out = loaded.model(batch.inputs, batch.present)
        direct = loaded.model.fuse(out.tokens, out.token_mask, "text")[:, 0]
    torch.testing.assert_close(feats.fused[:8], direct, rtol=1e-5, atol=1e-5)
    results = evaluate(model_dir, shards=str(asterisk_data / "train"), test_shards=str(asterisk_data / "test"),
                       label="family", out_dir=tmp_path / "eval", match_field="text", floor=False, robustness=False)
    assert results["family"] == "unified" and "fused" in results["pretrained"]["probe"]


def test_feature_extraction_cuts_text_padding_and_equals_the_full_length_pass(asterisk_data: Path,
                                                                               tmp_path: Path) -> None:
    """Both extractors run each batch's text cut to its longest transcript (`trim_padding`, as the trainer's feed):
    the text tower sees fewer positions than ``max_len`` and the features equal the uncut pass (1e-5)."""
    from mmssl.architectures.encoder import save_encoder
    from mmssl.data_pipelines.shards import resolve_shards
    from mmssl.data_pipelines.stream import read_once
    from mmssl.tools.evaluation.features import extract

    text = TextConfig(arch="clip", tokenizer=str(asterisk_data / "spm.model"), width=32, depth=2, heads=2, max_len=64)
    cfg = ModelConfig(embed_dim=16, towers={"text": text})
    loaded = load_model(save_model(tmp_path / "model", cfg, build_model(cfg, seed=5)))
    tower = loaded.model.towers["text"]
    seen: list[int] = []
    hook = tower.register_forward_pre_hook(lambda _, args: seen.append(args[0]["input_ids"].shape[1]))
    feats = extract_model_features(loaded, str(asterisk_data / "test"), batch_size=8, cache=False)
    hook.remove()
    batches = list(read_once(resolve_shards(str(asterisk_data / "test")), fields=loaded.fields(["text"]),
                             decoders=loaded.decoders(["text"]), batch_size=8))
    longest = [int(b.inputs["text"]["attention_mask"].sum(1).max()) for b in batches]  # right padding
    assert seen == [min(64, 8 * -(-n // 8)) for n in longest] and min(seen) < 64
    with torch.no_grad():
        full = torch.cat([loaded.model(b.inputs, b.present).embeddings["text"] for b in batches])
    assert full.shape == feats.embeddings["text"].shape
    torch.testing.assert_close(feats.embeddings["text"], full, rtol=1e-5, atol=1e-5)

    encoder_dir = save_encoder(tmp_path / "encoder", "text", text, tower, loaded.model.heads["text"], 16)
    one = extract(encoder_dir, str(asterisk_data / "test"), batch_size=8, cache=False)
    torch.testing.assert_close(one.embeddings, full, rtol=1e-5, atol=1e-5)
