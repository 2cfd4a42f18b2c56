"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` as image shards (the image-side probe benchmark and an
image-only source).

Source: ``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (70,000 real 28x28
grey-scale Zalando article images, 10 classes; MIT license). Each sample: ``png`` (lossless, the original pixels),
``json`` ``{"label": class name, "label_id": int, "index": position in the source file}``, and ``txt``: a caption
made from the class name with one of `TEMPLATES` (chosen by the image's index), so image-text recipes (stitching a
frozen language model, CLIP-style zero-shot) have a real image source. The caption carries no more than the label.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from mmssl.data_pipelines.shard_plan import write_shards
from mmssl.data_pipelines.shards import DataError, DatasetIndex

ROOT = Path("/usr/share/datasets/fashion-mnist")
INSTALL_COMMAND = "apt-get install -y --no-install-recommends dataset-fashion-mnist"
CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
FILES = {"train": "train", "test": "t10k"}
TEMPLATES = ("a photo of a {}.", "a grey picture of a {}.", "a {} on a black background.", "an image of a {}.",
             "a small photo of the {}.")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's format: magic, dimension sizes, big-endian uint8 payload)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str, root: Path = ROOT) -> tuple[np.ndarray, np.ndarray]:
    prefix = FILES[split]
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images, labels):
        if not path.is_file():
            raise DataError(f"Fashion-MNIST not installed ({path} is missing); install it with: {INSTALL_COMMAND}")
    return read_idx(images), read_idx(labels)


def _samples(images: np.ndarray, labels: np.ndarray, split: str, indices: np.ndarray) -> Iterator[dict]:
    for i in indices.tolist():
        buf = io.BytesIO()
        Image.fromarray(images[i], mode="L").save(buf, format="PNG")
        label = int(labels[i])
        yield {"__key__": f"{split}-{i:05d}", "png": buf.getvalue(),
               "json": {"label": CLASSES[label], "label_id": label, "index": i},
               "txt": TEMPLATES[i % len(TEMPLATES)].format(CLASSES[label])}


def _subset(split: str, limit: int | None, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The split's images and labels, and the indices kept: every n-th image so about ``limit`` remain."""
    images, labels = load_split(split, root)
    indices = np.arange(len(labels))
    if limit is not None and limit < len(indices):
        indices = indices[:: max(1, len(indices) // limit)][:limit]
    return images, labels, indices


def _info(split: str, **extra: str) -> dict[str, object]:
    return {"source": "dataset-fashion-mnist (Debian)", "license": "MIT (Zalando SE)", "split": split,
            "label_field": "label", "classes": list(CLASSES), **extra}


def build(out_dir: str | Path, *, shard_size: int = 5000, limit: int | None = None,
          root: Path = ROOT) -> dict[str, DatasetIndex]:
    """``out_dir/train`` and ``out_dir/test``; ``limit`` keeps every n-th image so about ``limit`` per split remain."""
    out = Path(out_dir)
    indexes = {}
    for split in ("train", "test"):
        images, labels, indices = _subset(split, limit, root)
        info = _info(split)
        indexes[split] = write_shards(_samples(images, labels, split, indices), out / split,
                                      name=f"fashion-mnist-{split}", max_count=shard_size, info=info)
    return indexes


CLIP_BENCHMARK_NAMES = {"classification": "fashion_mnist", "retrieval": "fashion_mnist_retrieval"}


def build_clip_benchmark(out_dir: str | Path, *, shard_size: int = 5000, limit: int | None = None,
                         root: Path = ROOT) -> dict[str, DatasetIndex]:
    """Fashion-MNIST in CLIP_benchmark's webdataset layout (its ``build_wds_dataset``), two datasets under
    ``out_dir``, for ``clip_benchmark eval --dataset wds/<name> --dataset_root out_dir/<name>``::

        fashion_mnist/                 zero-shot classification (and linear probe): the train and test splits
            classnames.txt             the 10 class names, one a line, in label order
            zeroshot_classification_templates.txt   `TEMPLATES` with CLIP_benchmark's ``{c}``
            {train,test}/0.tar ... nshards.txt index.json
        fashion_mnist_retrieval/       image-caption retrieval: the test split
            dataset_type.txt           ``retrieval``
            test/0.tar ... nshards.txt index.json

    A sample holds the mmssl members (``png``, ``json``, ``txt``: `build`'s) plus ``cls`` (the integer label) in the
    classification set, so ``mmssl evaluate --test-shards out_dir/fashion_mnist/test`` (through ``index.json``) and
    CLIP_benchmark read the same images. In the retrieval set ``txt`` is the image's one caption."""
    out = Path(out_dir)
    classification, retrieval = (out / CLIP_BENCHMARK_NAMES[k] for k in ("classification", "retrieval"))
    indexes = {}
    for split in ("train", "test"):
        images, labels, indices = _subset(split, limit, root)
        info = _info(split, layout="clip_benchmark")
        samples = ({**s, "cls": s["json"]["label_id"]} for s in _samples(images, labels, split, indices))
        sets = [(classification, samples)] + ([(retrieval, _samples(images, labels, split, indices))]
                                              if split == "test" else [])
        for dataset, stream in sets:
            index = write_shards(stream, dataset / split, name=f"{dataset.name}-{split}", max_count=shard_size,
                                 prefix="", info=info)
            (dataset / split / "nshards.txt").write_text(f"{len(index.shards)}\n")
            indexes[f"{dataset.name}/{split}"] = index
    (classification / "classnames.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    (classification / "zeroshot_classification_templates.txt").write_text(
        "".join(t.replace("{}", "{c}") + "\n" for t in TEMPLATES))
    (retrieval / "dataset_type.txt").write_text("retrieval\n")
    return indexes
