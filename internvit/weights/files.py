"""Reading checkpoint files: .pth/.bin pickles (weights_only), safetensors, sharded index folders, hub repos (of an
InternVL chat repo, only the shards of its vision tower are fetched: `backbone_shards`).

Shard indexes may only name files inside their own folder; our safetensors files are verified against their
`content_sha256` whenever they are read (`internvit.weights.integrity`), unless `verify_hash=False` or the
environment variable INTERNVIT_SKIP_HASH_CHECK=1.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import socket
import urllib.parse
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors import SafetensorError, safe_open

from internvit.errors import InternViTError
from internvit.weights.integrity import hash_check_enabled, verify_content_hash
from internvit.weights.keymaps import SET_ASIDE, VISION_PREFIXES, detect_layout
from internvit.weights.tags import PretrainedTag, resolve_tag

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REDOWNLOAD = "the file is corrupt or truncated: download or convert it again"
_BAD_INDEX = "download the index again, or rewrite its weight_map to name the shard files next to it"
_MAX_LISTED = 5


@dataclass
class RawCheckpoint:
    """Tensors as stored, with the files they came from and any safetensors metadata header."""

    tensors: dict[str, torch.Tensor] | object
    files: list[Path]
    metadata: dict[str, str] = field(default_factory=dict)
    tag: PretrainedTag | None = None

    @property
    def num_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


# ----------------------------------------------------------------------------------------------- reading


def _load_pickle(path: Path) -> object:
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive, or (legacy) a pickle opening with the PROTO opcode 0x80 and protocol 2..5;
    # anything else is garbage, which weights_only would misreport as "refused to unpickle"
    if not is_zip and not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise InternViTError(
            f"{path}: cannot read this PyTorch file (neither a zip archive nor a pickle)", fix=_REDOWNLOAD
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise InternViTError(
            f"{path}: refused to unpickle objects other than tensors ({str(e).splitlines()[0]})",
            fix="re-save the checkpoint as a plain state dict, or convert it to safetensors with trusted code",
        ) from e
    except Exception as e:  # a damaged pickle stream fails in many ways (IndexError, KeyError, ...): all mean corrupt
        raise InternViTError(
            f"{path}: cannot read this PyTorch file ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})",
            fix=_REDOWNLOAD,
        ) from e


def _load_safetensors(path: Path, verify_hash: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise InternViTError(f"{path}: cannot read this safetensors file ({e})", fix=_REDOWNLOAD) from e
    if verify_hash:
        verify_content_hash(path, tensors, metadata)
    return tensors, metadata


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        magic = f.read(2)
    # a zip archive (torch.save) or a legacy pickle (PROTO opcode 0x80) is a pickle whatever its suffix
    looks_pickled = magic == b"PK" or magic[:1] == b"\x80"
    return path.suffix == ".safetensors" or (path.suffix not in PICKLE_SUFFIXES and not looks_pickled)


def _load_file(path: Path, verify_hash: bool) -> tuple[object, dict[str, str]]:
    if _is_safetensors(path):
        return _load_safetensors(path, verify_hash)
    return _load_pickle(path), {}


def _allowed_roots(folder: Path) -> list[Path]:
    """Where the shards of an index in `folder` (resolved) may lie: the folder, and for a Hugging Face cache snapshot
    (`models--org--name/snapshots/REV/`, whose files are symlinks to `../../blobs/HASH`) that repository's blobs."""
    roots = [folder]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        roots.append(folder.parent.parent / "blobs")
    return roots


def _weight_map(data: object, where: object) -> dict[str, str]:
    """The `weight_map` of a parsed shard index: a non-empty object of tensor name -> shard file name, or an error."""
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InternViTError(
            f"{where}: not a valid shard index (needs a non-empty 'weight_map' object of tensor name -> shard file)",
            fix=_BAD_INDEX,
        )
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise InternViTError(
                f"{where}: weight_map entry {key!r} is {json.dumps(name)}, not a shard file name", fix=_BAD_INDEX
            )
    return weight_map


def _parse_index(index: Path) -> Any:
    try:
        return json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InternViTError(f"{index}: not a valid shard index (not JSON: {e})", fix=_BAD_INDEX) from e


def backbone_shards(
    index: Mapping[str, object], prefixes: tuple[str, ...] = VISION_PREFIXES, *, where: object = "shard index"
) -> list[str]:
    """The shard files of a parsed shard index that hold the vision backbone, sorted: those with tensors under the
    first of `prefixes` any tensor has (an InternVL chat repo: the vision tower, not the LLM; a clip_projector
    beside it too), as `to_native` splits them; every shard when no tensor has a prefix and the names are a bare
    backbone's (an InternViT repo); a clear error when the index holds no vision backbone at all."""
    weight_map = _weight_map(index, where)
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in weight_map)), None)
    if prefix is None:
        try:
            detect_layout(list(weight_map))
        except InternViTError:
            shown = ", ".join(sorted(weight_map)[:_MAX_LISTED])
            raise InternViTError(
                f"{where}: no tensor of a vision backbone in it (none under {', '.join(prefixes)}, and no bare "
                f"InternViT keys; first keys: {shown})",
                fix="pass an InternViT repo, or an InternVL chat repo whose index maps its vision tower to shards",
            ) from None
        return sorted(set(weight_map.values()))
    keep = (prefix, *SET_ASIDE)
    return sorted({name for key, name in weight_map.items() if key.startswith(keep)})


def _read_index(index: Path) -> tuple[dict[str, str], list[Path]]:
    """The weight map and the shard files of a sharded index (`*.index.json`), checked before any shard is read:
    the index must be a JSON object with a non-empty `weight_map` of tensor name -> shard file name; every shard
    must lie inside the index's folder (no absolute path, no `..`, no symlink out of it) and exist, except shards
    that hold no backbone tensor (an InternVL chat repo fetched for its vision tower: `backbone_shards`), which
    are skipped. Returns the weight map of the shards that are read, and their files."""
    data = _parse_index(index)
    weight_map = _weight_map(data, index)
    folder = index.parent.resolve()
    roots = _allowed_roots(folder)
    shards: dict[str, Path] = {}
    for key, name in weight_map.items():
        if name in shards:
            continue
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise InternViTError(
                f"{index}: weight_map entry {key!r} names {name!r}, outside the index's folder {folder}",
                fix=_BAD_INDEX,
            )
        try:
            target = (folder / rel).resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop
            raise InternViTError(
                f"{index}: weight_map entry {key!r}: cannot resolve {name!r} ({e})", fix=_BAD_INDEX
            ) from e
        if not any(target.is_relative_to(root) for root in roots):
            raise InternViTError(
                f"{index}: weight_map entry {key!r} names {name!r}, a symlink to {target}, "
                f"outside the index's folder {folder}",
                fix=_BAD_INDEX,
            )
        shards[name] = folder / rel
    absent = [name for name, shard in shards.items() if not shard.is_file()]
    if absent:
        needed = set(backbone_shards(data, where=index))
        missing = [name for name in absent if name in needed]
        if missing:
            held = next(k for k, name in weight_map.items() if name == missing[0])
            raise InternViTError(
                f"{index}: {len(missing)} shard file(s) it lists are missing: {', '.join(missing)}",
                fix=f"they hold backbone tensors (e.g. {held}): download the whole repository (every shard next to "
                "the index), or at least every shard of the vision backbone",
            )
        log.info("%s: %d shard(s) outside the vision backbone are not here, skipped", index, len(absent))
        shards = {name: shard for name, shard in shards.items() if name not in absent}
    return {k: name for k, name in weight_map.items() if name in shards}, list(shards.values())


def _load_index(index: Path, verify_hash: bool) -> RawCheckpoint:
    weight_map, shards = _read_index(index)
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        part, _ = _load_file(shard, verify_hash)
        if not isinstance(part, dict):
            raise InternViTError(f"{shard}: a shard must hold a flat state dict", fix=_REDOWNLOAD)
        tensors.update(part)
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise InternViTError(
            f"{index.parent}: {len(absent)} tensor(s) in the index are in no shard, e.g. {absent[0]}", fix=_REDOWNLOAD
        )
    return RawCheckpoint(tensors, [index, *shards])


def read_header(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]] | None:
    """The safetensors header(s) of a checkpoint file or shard index, without reading any tensor data: the metadata
    (of a single file) and every tensor as an empty "meta" tensor of its shape; None when a file is a pickle."""
    files = _read_index(path)[1] if path.name.endswith(".index.json") else [path]
    if not all(_is_safetensors(f) for f in files):
        return None
    metadata: dict[str, str] = {}
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                metadata = dict(f.metadata() or {}) if len(files) == 1 else {}
                for key in f.keys():  # noqa: SIM118
                    state[key] = torch.empty(f.get_slice(key).get_shape(), device="meta")
        except (SafetensorError, OSError, ValueError) as e:
            raise InternViTError(f"{file}: cannot read this safetensors file ({e})", fix=_REDOWNLOAD) from e
    return metadata, state


def _find_in_dir(folder: Path) -> Path:
    for name in (*INDEX_NAMES, *SINGLE_NAMES):
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", *PICKLE_SUFFIXES))
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates) or "no checkpoint files"
    raise InternViTError(
        f"{folder}: cannot tell which checkpoint to load ({found})",
        fix="pass the file itself, or a folder with model.safetensors[.index.json] or pytorch_model.bin[.index.json]",
    )


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection within `timeout_s` (no retries: an offline machine learns it
    at once instead of after the hub client's back-off)."""
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _fetch_repo(repo_id: str, *, local_only: bool) -> Path:
    """A repo's configs and the weight files of its vision backbone only: the json files first, then, where a shard
    index lists the files, just the shards `backbone_shards` names (not an InternVL chat repo's LLM), else every
    single file; safetensors, else (older repos) .bin pickles."""
    folder = Path(snapshot_download(repo_id, allow_patterns=["*.json"], local_files_only=local_only))
    for index_name, pattern in zip(INDEX_NAMES, ("*.safetensors", "*.bin"), strict=True):
        index = folder / index_name
        if index.is_file():
            wanted = backbone_shards(_parse_index(index), where=f"{repo_id}: {index_name}")
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", *wanted], local_files_only=local_only))
            absent = [name for name in wanted if not (folder / name).is_file()]
            if absent and local_only:  # a partial hub cache: `download` fetches them (online, the loader names them)
                raise FileNotFoundError(f"{repo_id}: shard(s) not in the hub cache: {', '.join(absent)}")
            return folder
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", pattern], local_files_only=local_only))
        if any(folder.glob(pattern)):
            return folder
    return folder


def _fetch(repo_id: str, filename: str | None, *, local_only: bool) -> Path:
    if filename:
        return Path(hf_hub_download(repo_id, filename, local_files_only=local_only))
    return _fetch_repo(repo_id, local_only=local_only)


def download(repo_id: str, filename: str | None = None) -> Path:
    """Fetch a hub repo (HF-format weights and configs) or one file of it: from the local hub cache when it is
    there, else from the hub; offline (HF_HUB_OFFLINE=1, or the hub unreachable) a clear error at once."""
    what = f"{repo_id}/{filename}" if filename else repo_id
    get = f"{repo_id} {filename}" if filename else repo_id
    local = f"the local path DIR/{filename}" if filename else "the local path DIR"
    fix = (
        f"download it where there is internet (`hf download {get} --local-dir DIR`) and pass {local}, or copy the "
        "hub cache (~/.cache/huggingface/hub, HF_HOME) here and set HF_HUB_OFFLINE=1"
    )
    try:
        return _fetch(repo_id, filename, local_only=True)
    except InternViTError:  # the repo's own index is unusable (no vision backbone, malformed): fetching won't help
        raise
    except Exception:  # noqa: BLE001 - not in the cache (the error type varies by hub version): fetch it
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or not hub_reachable():
        raise InternViTError(f"{what} is not in the local hub cache and the Hugging Face Hub is not reachable", fix=fix)
    try:
        return _fetch(repo_id, filename, local_only=False)
    except InternViTError:
        raise
    except Exception as e:  # hub errors vary by version and network state; all mean "not available here"
        raise InternViTError(f"could not fetch {what} from the Hugging Face Hub ({type(e).__name__})", fix=fix) from e


def looks_like_hub_id(source: str) -> bool:
    """`org/name`, but not a mistyped local path (`ckpts/model.pth`, or a first folder that exists here)."""
    if not HUB_ID.match(source) or source.startswith((".", "/")):
        return False
    return (
        Path(source).suffix not in (".safetensors", ".json", *PICKLE_SUFFIXES)
        and not Path(source.split("/")[0]).exists()
    )


def locate_checkpoint(source: str | Path) -> tuple[Path, PretrainedTag | None]:
    """The checkpoint file (or shard index) a source names, downloading a tag or hub id; and the tag, if it is one."""
    path = Path(source).expanduser()
    tag = None
    if not path.exists():
        tag = resolve_tag(str(source))
        if tag is not None:
            path = download(tag.hub_id, tag.filename)
        elif looks_like_hub_id(str(source)):
            path = download(str(source))
        else:
            raise InternViTError(
                f"no such file or folder: {source}",
                fix="check the path, or pass a named tag (see `internvit models --tags`) or a hub id like org/name",
            )
    if path.is_dir():
        path = _find_in_dir(path)
    return path, tag


def read_checkpoint(source: str | Path, *, verify_hash: bool = True) -> RawCheckpoint:
    """Read a checkpoint from a file, a folder, a named tag (`internvit-6b-224px.hf`) or a hub id (`org/name`).

    A safetensors file whose metadata has a `content_sha256` (our files, written by `convert`) is verified against
    it, streaming, and refused if it was modified or corrupted. `verify_hash=False` skips that for this call; the
    environment variable INTERNVIT_SKIP_HASH_CHECK=1 skips it for every load (the command line included), to save
    the extra pass over the bytes of a large file.
    """
    path, tag = locate_checkpoint(source)
    verify_hash = hash_check_enabled(verify_hash)
    if path.name.endswith(".index.json"):
        raw = _load_index(path, verify_hash)
    else:
        tensors, metadata = _load_file(path, verify_hash)
        raw = RawCheckpoint(tensors, [path], metadata)
    raw.tag = tag
    return raw


def checkpoint_identity(source: str) -> dict[str, object]:
    """What identifies a backbone checkpoint cheaply, for a run's resume settings: our files' content hash (from
    the header), else path, size and modification time of each file; a tag, hub id or "random" by its name."""
    path = Path(source).expanduser()
    if not path.exists():
        return {"source": str(source)}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if len(files) == 1 and files[0].suffix == ".safetensors":
        try:
            with safe_open(files[0], framework="pt") as f:
                digest = (f.metadata() or {}).get("content_sha256")
        except (SafetensorError, OSError):
            digest = None
        if digest:
            return {"content_sha256": digest}
    return {"files": [[str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)] for p in files]}
