"""Frozen features computed once: `cls extract` writes them in shards, `cls knn` scores weighted kNN on them.

For a frozen backbone the forward pass is the whole cost of probing. Extraction runs it once per image and view
(by default one view, the eval transform: resize + center crop; with `features.views=K`, K views of the training
split through the paper's train transform, RandomResizedCrop + flip, seeded per (image, view)) and stores, per
image, the cls token of the last block (`cls`), the mean of the last block's patch tokens (`mean`; cls || mean is
the paper head's input) and the cls tokens of the last 4 blocks (`cls4`), in bf16 (or fp16 / fp32), with the image's
dataset index and target.

Layout of a feature folder: `manifest.json` (the backbone file's identity, preset, resolution, transform, dtype,
variants, and per set its image count, shard size and the sha256 of its image list) and `<set>/shard_%05d.safetensors`
of `shard_size` images each (the K views of the training split are the sets `train.v0` ... `train.v{K-1}`). Shards
are written atomically and skipped when present, so a killed extraction resumes at shard granularity; rank r of W
extracts shards r, r + W, ... (each image exactly once). Features are read back memory-mapped (`FeatureShards`):
training on them reads the rows a batch needs, never the whole set. A folder made with another backbone,
resolution, transform or image list is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from internvit.atomic import atomic_path, write_json
from internvit.data.imagenet import collate_skip_none
from internvit.engine.distributed import DistInfo, barrier
from internvit.engine.precision import DTYPES, autocast
from internvit.engine.progress import progress
from internvit.errors import InternViTError

log = logging.getLogger(__name__)
VARIANTS = ("cls", "mean", "cls4")
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: `views` counts augmented views (0: the center crop), sets train or train.v<k>


def image_list_hash(dataset) -> str:
    """sha256 over the dataset's (file name, target) list, in order: the same images in the same order."""
    digest = hashlib.sha256()
    for path, target in dataset.samples:
        digest.update(f"{Path(path).name}\t{target}\n".encode())
    return digest.hexdigest()


def set_entry(dataset, shard_size: int) -> dict:
    num = len(dataset)
    return {
        "num_images": num,
        "shard_size": shard_size,
        "num_shards": -(-num // shard_size),
        "images_sha256": image_list_hash(dataset),
        "num_classes": dataset.num_classes,
        "classes": list(dataset.classes),
        "class_names": list(dataset.class_names),
    }


def check_manifest(path: Path, expected: dict) -> None:
    """Refuse a feature folder whose manifest differs from what this extraction would write (naming the fields)."""
    found = json.loads(path.read_text())
    differing = []
    for key, value in expected.items():
        if key == "sets":
            continue
        if found.get(key) != value:
            differing.append(f"{key}: {found.get(key)!r} there, {value!r} now")
    for name, entry in expected["sets"].items():
        if name in found.get("sets", {}) and found["sets"][name] != entry:
            differing.append(f"set {name}: {found['sets'][name]} there, {entry} now")
    if differing:
        raise InternViTError(
            f"{path} was made with other settings: " + "; ".join(differing[:4]),
            fix="use another features folder (features.out=...) or delete this one",
        )


def shard_path(root: Path, name: str, shard: int) -> Path:
    return root / name / f"shard_{shard:05d}.safetensors"


@torch.no_grad()
def backbone_features(backbone, images: torch.Tensor, precision: str) -> dict[str, torch.Tensor]:
    """The three variants of a batch: cls (B, C), mean (B, C), cls4 (B, 4, C), in fp32."""
    depth = len(backbone.blocks)
    with autocast(images.device, precision):
        taps = backbone.get_intermediate_layers(images, list(range(max(depth - 4, 0), depth)), output="tokens")
    last = taps[-1].float()
    return {
        "cls": last[:, 0],
        "mean": last[:, 1:].mean(dim=1),
        "cls4": torch.stack([t[:, 0].float() for t in taps], dim=1),
    }


def extract_set(
    backbone,
    dataset,
    name: str,
    root: Path,
    *,
    entry: dict,
    batch_size: int,
    num_workers: int,
    dtype: str,
    precision: str,
    dist: DistInfo,
) -> tuple[int, int]:
    """Write this rank's missing shards of one set; returns (images run through the backbone, images skipped as
    undecodable under data.skip_corrupt)."""
    done = skipped = 0
    shards = range(dist.rank, entry["num_shards"], dist.world_size)
    todo = [k for k in shards if not shard_path(root, name, k).is_file()]
    (root / name).mkdir(parents=True, exist_ok=True)
    bar = progress(total=len(todo), desc=f"extract {name}", unit="shard", disable=not dist.is_main, leave=False)
    # one loader over every missing shard (its workers start once), in batches that never straddle two shards
    plan: list[tuple[int, list[int]]] = []
    for shard in todo:
        start = shard * entry["shard_size"]
        indices = list(range(start, min(start + entry["shard_size"], entry["num_images"])))
        plan += [(shard, indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
    loader = DataLoader(
        dataset,
        batch_sampler=[indices for _, indices in plan],
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        pin_memory=dist.device.type == "cuda",
    )
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in (*VARIANTS, "index", "target")}
    expected = 0
    for position, ((shard, indices), batch) in enumerate(zip(plan, loader, strict=True)):
        expected += len(indices)
        if batch is not None:
            images, targets, idx = batch
            feats = backbone_features(backbone, images.to(dist.device, non_blocking=True), precision)
            for key in VARIANTS:
                parts[key].append(feats[key].to(DTYPES[dtype]).cpu())
            parts["index"].append(idx.long())
            parts["target"].append(targets.long())
            done += len(idx)
        if position + 1 < len(plan) and plan[position + 1][0] == shard:
            continue  # the shard goes on in the next batch
        kept = sum(len(i) for i in parts["index"])
        skipped += expected - kept
        if not kept:
            raise InternViTError(
                f"every image of {name} shard {shard} was undecodable", fix="remove the corrupt files and rerun"
            )
        tensors = {key: torch.cat(values).contiguous() for key, values in parts.items()}
        with atomic_path(shard_path(root, name, shard)) as tmp:
            save_file(tensors, str(tmp), metadata={"shard": f"{name}/{shard}"})  # one key: the bytes are reproducible
        parts = {key: [] for key in parts}
        expected = 0
        bar.update(1)
    bar.close()
    return done, skipped


def extract(
    backbone,
    datasets: dict[str, object],
    root: Path,
    *,
    manifest: dict,
    shard_size: int,
    batch_size: int,
    num_workers: int,
    dtype: str,
    precision: str,
    dist: DistInfo,
) -> dict[str, tuple[int, int]]:
    """Extract every set (resuming at shard granularity); returns (backbone forwards, skipped images) per set on
    this rank."""
    expected = {**manifest, "sets": {name: set_entry(ds, shard_size) for name, ds in datasets.items()}}
    path = root / MANIFEST
    if path.is_file():
        check_manifest(path, expected)
        found = json.loads(path.read_text())
        expected["sets"] = {**found.get("sets", {}), **expected["sets"]}
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        write_json(path, expected)
    barrier()
    forwards = {}
    for name, dataset in datasets.items():
        entry = expected["sets"][name]
        forwards[name] = extract_set(
            backbone,
            dataset,
            name,
            root,
            entry=entry,
            batch_size=batch_size,
            num_workers=num_workers,
            dtype=dtype,
            precision=precision,
            dist=dist,
        )
    barrier()
    return forwards


def train_set_names(views: int) -> list[str]:
    """The cached sets of the training split: `train` (one center crop), or `train.v0` ... for K augmented views."""
    return ["train"] if views == 0 else [f"train.v{k}" for k in range(views)]


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise InternViTError(f"no {MANIFEST} in {root}", fix="run `internvit cls extract` first (features.out=DIR)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise InternViTError(
            f"{root} holds features of format {manifest.get('format')}, this version reads format {FORMAT_VERSION}",
            fix="extract them again into a new folder (features.out=...)",
        )
    return manifest


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64}


def map_shard(path: Path, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors `keys` of one safetensors shard as views into a read-only memory map of the file: nothing is
    read until a row is used. (safetensors' own loaders copy every tensor into memory, which a 1.28M-image training
    set in bf16, 38 KB per image, does not fit.) A tensor whose offset is not aligned to its element size is read."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for key in keys:
        info = header[key]
        dtype = _ST_DTYPES[info["dtype"]]
        begin, end = (8 + size + offset for offset in info["data_offsets"])
        if begin % torch.empty(0, dtype=dtype).element_size():
            with safe_open(str(path), framework="pt") as f:
                out[key] = f.get_tensor(key)
            continue
        with warnings.catch_warnings():  # the map is read-only and nothing writes to these tensors
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(data[begin:end])
        out[key] = raw.view(dtype).reshape(info["shape"])
    return out


class FeatureShards:
    """One cached set, memory-mapped shard by shard, in dataset order: `index` and `target` in memory, the feature
    variants read by `rows(positions)` where they are needed."""

    def __init__(self, root: Path, name: str, variants: Sequence[str] = VARIANTS) -> None:
        manifest = read_manifest(root)
        entry = manifest.get("sets", {}).get(name)
        if entry is None:
            raise InternViTError(
                f"{root} holds no features of set {name!r} (it has: {', '.join(manifest.get('sets', {})) or 'none'})",
                fix=f"extract it: internvit cls extract features.sets=[{name.split('.')[0]}]",
            )
        missing = [k for k in range(entry["num_shards"]) if not shard_path(root, name, k).is_file()]
        if missing:
            raise InternViTError(
                f"{root}/{name} lacks {len(missing)} of its {entry['num_shards']} shards (e.g. {missing[0]})",
                fix="rerun the same `internvit cls extract` to finish it",
            )
        self.variants = tuple(variants)
        keys = (*self.variants, "index", "target")
        self.shards = [map_shard(shard_path(root, name, k), keys) for k in range(entry["num_shards"])]
        sizes = torch.tensor([len(shard["index"]) for shard in self.shards])
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        self.index = torch.cat([shard["index"] for shard in self.shards])
        self.target = torch.cat([shard["target"] for shard in self.shards])

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, positions: torch.Tensor, variants: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The variants (default all mapped ones), `index` and `target` of the rows at `positions`, in that order."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        which = torch.searchsorted(self.starts, positions, right=True) - 1
        out: dict[str, torch.Tensor] = {"index": self.index[positions], "target": self.target[positions]}
        for key in variants or self.variants:
            first = self.shards[0][key]
            values = torch.empty((len(positions), *first.shape[1:]), dtype=first.dtype)
            for shard in which.unique().tolist():
                chosen = (which == shard).nonzero().squeeze(1)
                values[chosen] = self.shards[shard][key][positions[chosen] - self.starts[shard]]
            out[key] = values
        return out


def load_features(root: Path, name: str, variants: Sequence[str] = VARIANTS) -> dict[str, torch.Tensor]:
    """One set's features (all shards, in memory), with `index` and `target`, in dataset order."""
    shards = FeatureShards(root, name, variants)
    return {key: torch.cat([shard[key] for shard in shards.shards]) for key in (*variants, "index", "target")}


def feature_variant(features: dict[str, torch.Tensor], variant: str) -> torch.Tensor:
    """A probe input from the stored variants: cls, mean, cls_mean (cls || mean), cls4 (4 cls tokens concatenated),
    cls4_mean (cls4 || mean), in fp32."""
    pieces = {
        "cls": ["cls"],
        "mean": ["mean"],
        "cls_mean": ["cls", "mean"],
        "cls4": ["cls4"],
        "cls4_mean": ["cls4", "mean"],
    }
    if variant not in pieces:
        raise InternViTError(f"unknown feature variant {variant!r}", fix=f"use one of {', '.join(pieces)}")
    return torch.cat([features[k].float().flatten(1) for k in pieces[variant]], dim=1)


@torch.no_grad()
def knn_scores(
    train: torch.Tensor,
    train_targets: torch.Tensor,
    test: torch.Tensor,
    *,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk: int = 256,
) -> dict[int, torch.Tensor]:
    """Weighted kNN class scores (DINO's rule) for each k: cosine similarity on L2-normalised features, the k nearest
    training samples vote for their class with weight exp(sim / temperature). Test samples are processed in chunks
    (memory stays at chunk x train similarities). Returns {k: (num_test, num_classes) scores}."""
    train = torch.nn.functional.normalize(train.float(), dim=1)
    k_max = min(max(ks), len(train))
    out = {k: [] for k in ks}
    for start in range(0, len(test), chunk):
        queries = torch.nn.functional.normalize(test[start : start + chunk].float(), dim=1)
        sims, idx = (queries @ train.T).topk(k_max, dim=1)
        weights = (sims / temperature).exp()
        labels = train_targets[idx]
        for k in ks:
            kk = min(k, k_max)
            scores = torch.zeros(len(queries), num_classes)
            scores.scatter_add_(1, labels[:, :kk], weights[:, :kk])
            out[k].append(scores)
    return {k: torch.cat(v) for k, v in out.items()}
