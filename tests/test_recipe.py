"""Recipes: strict typed loading, origins in error messages, dotted overrides, pre-launch validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmssl.architectures.towers import ArchitectureError
from mmssl.data_pipelines.shards import DataError
from mmssl.objectives.base import ObjectiveError
from mmssl.pretrain.recipe import RecipeError, TrainConfig, dump_recipe, list_bundled_recipes, load_recipe
from mmssl.pretrain.validate import validate_recipe
from tests.conftest import tiny_recipe_dict, write_recipe


@pytest.fixture
def recipe_file(tmp_path: Path, asterisk_data: Path) -> Path:
    return write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(asterisk_data))


def test_overrides_reach_nested_modality_configs(recipe_file: Path) -> None:
    r = load_recipe(recipe_file, ["train.steps=50", "model.audio.depth=2", "model.audio.patch_size=[16,8]",
                                  "data.eval=null", "train.lr=3e-4"])
    assert r.train.steps == 50 and isinstance(r.train.steps, int)
    assert r.model.towers["audio"].depth == 2
    assert r.model.towers["audio"].patch_size == [16, 8]
    assert r.data.eval is None
    assert r.train.lr == pytest.approx(3e-4)


def test_unknown_key_names_key_file_and_valid_keys(tmp_path: Path, asterisk_data: Path) -> None:
    raw = tiny_recipe_dict(asterisk_data)
    raw["train"]["stpes"] = 10
    path = write_recipe(tmp_path / "bad.yaml", raw)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert str(path) in msg and "'train.stpes'" in msg and "steps" in msg and "warmup_steps" in msg
    assert "\n" not in msg


def test_unknown_modality_lists_registered_ones(recipe_file: Path) -> None:
    with pytest.raises(RecipeError, match=r"command-line override 'model\.smell\.depth=2': unknown key "
                                          r"'model\.smell'.*audio, image, sequence, text, video"):
        load_recipe(recipe_file, ["model.smell.depth=2"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.steps=abc", r"'train\.steps' expects int, got 'abc' \(str\)"),
        ("train.lr=fast", r"'train\.lr' expects float, got 'fast'"),
        ("model.audio.depth=2.5", r"'model\.audio\.depth' expects int, got 2\.5"),
        ("train.deterministic=maybe", r"'train\.deterministic' expects bool"),
        ("objectives.contrastive.pairs=3", r"'objectives\.contrastive\.pairs' expects list"),
    ],
)
def test_mistyped_override_is_one_line_naming_the_value(recipe_file: Path, override: str, expected: str) -> None:
    with pytest.raises(RecipeError, match=expected) as err:
        load_recipe(recipe_file, [override])
    assert f"command-line override {override!r}" in str(err.value)


def test_mistyped_value_in_file_names_the_file(tmp_path: Path, asterisk_data: Path) -> None:
    raw = tiny_recipe_dict(asterisk_data)
    raw["data"]["batch_size"] = "eight"
    path = write_recipe(tmp_path / "bad.yaml", raw)
    with pytest.raises(RecipeError, match=rf"{path}: 'data\.batch_size' expects int, got 'eight'"):
        load_recipe(path)


def test_malformed_override_rejected(recipe_file: Path) -> None:
    with pytest.raises(RecipeError, match=r"must look like key\.path=value"):
        load_recipe(recipe_file, ["train.steps"])


def test_resolved_recipe_round_trips(tmp_path: Path, recipe_file: Path) -> None:
    r = load_recipe(recipe_file, ["model.text.max_len=12"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(dump_recipe(r))
    again = load_recipe(saved)
    assert again == r
    assert yaml.safe_load(saved.read_text())["model"]["audio"]["depth"] == 1  # modality keys flattened back


def test_bundled_recipes_load_by_name() -> None:
    assert "quickstart" in list_bundled_recipes()
    r = load_recipe("quickstart")
    assert set(r.model.towers) == {"audio", "text"}
    with pytest.raises(RecipeError, match="neither a file nor a bundled recipe"):
        load_recipe("no-such-recipe")


def test_objective_needing_a_missing_modality_fails_before_launch(recipe_file: Path) -> None:
    r = load_recipe(recipe_file, ["objectives.contrastive.pairs=[[audio,image]]"])
    with pytest.raises(ObjectiveError, match=r"objectives\.contrastive needs modality 'image'.*\['audio', 'text'\]"):
        validate_recipe(r, world_size=2)


def test_missing_shard_path_fails_before_launch(recipe_file: Path, tmp_path: Path) -> None:
    r = load_recipe(recipe_file, [f"data.train={tmp_path}/nowhere/shard-{{000000..000003}}.tar"])
    with pytest.raises(DataError, match=r"data\.train: shard not found: .*nowhere/shard-000000\.tar \(and 3 more\)"):
        validate_recipe(r, world_size=2)


def test_too_few_shards_for_readers_is_caught(recipe_file: Path) -> None:
    r = load_recipe(recipe_file, ["data.streams_per_rank=16"])
    with pytest.raises(DataError, match=r"cannot feed 2 rank\(s\) x 16 stream\(s\)"):
        validate_recipe(r, world_size=2)


def test_missing_tokenizer_and_bad_precision(recipe_file: Path, tmp_path: Path) -> None:
    r = load_recipe(recipe_file, [f"model.text.tokenizer={tmp_path}/missing.model"])
    with pytest.raises(RecipeError, match=r"model\.text\.tokenizer: file not found: .*missing\.model"):
        validate_recipe(r, world_size=1)
    r = load_recipe(recipe_file, ["train.precision=fp16"])
    with pytest.raises(RecipeError, match=r"fp16 .* use bf16"):
        validate_recipe(r, world_size=1)
    r = load_recipe(recipe_file, ["model.audio.arch=vit_nonexistent"])
    with pytest.raises(ArchitectureError, match="unknown timm architecture 'vit_nonexistent'"):
        validate_recipe(r, world_size=1)


def _with_objectives(tmp_path: Path, asterisk_data: Path, objectives: dict, **sections: dict):
    raw = tiny_recipe_dict(asterisk_data, **sections)
    raw["objectives"] = objectives
    return load_recipe(write_recipe(tmp_path / "o.yaml", raw))


@pytest.mark.parametrize(("objectives", "sections", "error", "message"), [
    ({"matching": {"query": "text", "context": "audio"}}, {}, ObjectiveError,
     r"objectives\.matching needs a fusion module, which model\.family='fusion_free' does not have"),
    ({"clustering": {"modalities": ["audio", "text"], "variant": "xdc", "num_clusters": 512,
                     "samples_per_refresh": 256}}, {}, ObjectiveError,
     r"objectives\.clustering: .*num_clusters.*512.*samples_per_refresh.*256"),
    ({"siglip": {"pairs": [["audio", "video"]]}}, {}, ObjectiveError,
     r"objectives\.siglip needs modality 'video'"),
    ({"intramodal": {"modalities": ["audio"]}}, {}, RecipeError,
     r"objectives\.intramodal needs the augmented view 'audio@1': set data\.views\.audio: 2"),
    ({"momentum_contrastive": {"pairs": [["audio", "text"]]}}, {"train": {"zero_stage": 3}}, RecipeError,
     r"objectives\.momentum_contrastive needs train\.zero_stage <= 2"),
    ({"mae": {"modality": "text"}}, {}, ObjectiveError, r"objectives\.mae"),
    ({"mlm": {"modality": "text"}},
     {"model": {"family": "unified", "unified": {"width": 48, "depth": 1, "heads": 2, "drop_tokens": {"text": 0.5}}}},
     RecipeError, r"objectives\.mlm predicts masked 'text' tokens, but model\.unified\.drop_tokens\.text=0\.5"),
])
def test_objective_configuration_errors_name_the_key(tmp_path: Path, asterisk_data: Path, objectives: dict,
                                                     sections: dict, error: type, message: str) -> None:
    recipe = _with_objectives(tmp_path, asterisk_data, objectives, **sections)
    with pytest.raises(error, match=message):
        validate_recipe(recipe, world_size=2)


@pytest.mark.parametrize(("overrides", "error", "message"), [
    (["train.accumulation=sometimes"], RecipeError, r"train\.accumulation must be 'cached' or 'naive', got 'some"),
    (["data.views={video: 2}"], RecipeError, r"data\.views\.video: the model has no 'video' tower"),
    (["data.views={audio: 0}"], RecipeError, r"data\.views\.audio must be >= 1, got 0"),
    (["model.family=late_fusion", "model.fusion.query=image"], ArchitectureError,
     r"model\.fusion\.query='image' names no tower"),
])
def test_new_model_and_train_keys_are_checked(recipe_file: Path, overrides: list[str], error: type,
                                              message: str) -> None:
    r = load_recipe(recipe_file, overrides)
    with pytest.raises(error, match=message):
        validate_recipe(r, world_size=2)


def test_late_fusion_recipe_validates(recipe_file: Path) -> None:
    validate_recipe(load_recipe(recipe_file, ["model.family=late_fusion"]), world_size=2)


# --------------------------------------------------------------------------------------------------- inheritance
def test_a_recipe_with_a_base_holds_only_what_differs(tmp_path: Path) -> None:
    from mmssl.pretrain.recipe import merge_recipe

    base = {"name": "b", "model": {"audio": {"depth": 4, "width": 64}, "text": {"depth": 2}},
            "objectives": {"contrastive": {"pairs": [["audio", "text"]]}, "mlm": {"modality": "text"}},
            "train": {"steps": 100, "lr": 0.1}}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base": "b.yaml", "name": "c", "model": {"audio": {"depth": 1}},
                                                     "objectives": {"mlm": None}, "train": {"lr": None}}))
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"base": str(tmp_path / "c.yaml"), "name": "d",
                                                     "train": {"steps": 5}}))
    merged = merge_recipe(base, {"model": {"audio": {"depth": 1}}, "objectives": {"mlm": None}, "train": {"lr": None}})
    assert merged["model"] == {"audio": {"depth": 1, "width": 64}, "text": {"depth": 2}}  # mappings merge
    assert set(merged["objectives"]) == {"contrastive"} and "lr" not in merged["train"]  # null takes a key out
    d = load_recipe(tmp_path / "d.yaml")  # a chain: d -> c -> b
    assert d.name == "d" and d.train.steps == 5 and d.train.lr == TrainConfig().lr  # the default, not b's 0.1
    assert (d.model.towers["audio"].depth, d.model.towers["audio"].width) == (1, 64)
    assert list(d.objectives.terms) == ["contrastive"]
    saved = yaml.safe_load(dump_recipe(d))  # what a run directory stores: whole, no base
    assert "base" not in saved and saved["model"]["audio"]["width"] == 64 and saved["train"]["steps"] == 5


def test_a_cycle_or_a_missing_base_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("base: y.yaml\nname: x\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\nname: y\n")
    with pytest.raises(RecipeError, match=r"base 'x\.yaml' makes a cycle: .*x\.yaml -> .*y\.yaml -> .*x\.yaml"):
        load_recipe(tmp_path / "x.yaml")
    (tmp_path / "z.yaml").write_text("base: nope\nname: z\n")
    with pytest.raises(RecipeError, match=r"z\.yaml: base 'nope' is neither a file nor a bundled recipe"):
        load_recipe(tmp_path / "z.yaml")
    (tmp_path / "w.yaml").write_text("base: [clip]\nname: w\n")
    with pytest.raises(RecipeError, match=r"w\.yaml: base must name a recipe .* got \['clip'\]"):
        load_recipe(tmp_path / "w.yaml")


def test_bundled_tiny_recipes_shrink_their_full_recipe() -> None:
    """Every ``NAME-tiny`` names ``NAME`` as its base, except the two whose CPU-scale data swaps a modality."""
    from mmssl.pretrain.recipe import bundled_recipe_path

    for name in list_bundled_recipes():
        if not name.endswith("-tiny"):
            continue
        raw = yaml.safe_load(bundled_recipe_path(name).read_text())
        expected = None if name in ("vatt-tiny", "xdc-tiny") else name.removesuffix("-tiny")
        assert raw.get("base") == expected, name
        assert load_recipe(name).name == name
