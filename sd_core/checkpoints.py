"""Model files in the models folder: checkpoints (single files and diffusers folders), VAEs and LoRAs.

Scans, hashes (A1111 titles "name [10-hex sha256]", cached in a sidecar file), resolves A1111 aliases, reads
safetensors headers safely, and refuses pickles without SD_ALLOW_PICKLE and paths outside the models folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sd_core.architectures import Architecture, detect_config_folder, detect_single_file, yaml_v_prediction_hint
from sd_core.config import CoreConfig
from sd_core.errors import CheckpointNotFoundError, CheckpointRefusedError

log = logging.getLogger(__name__)

_HASH_BLOCK = 1024 * 1024
SIDECAR_SUFFIX = ".sha256.json"
CONFIG_FOLDER_SUFFIX = ".config"


class CheckpointFormat(StrEnum):
    SINGLE_FILE = "single_file"
    DIFFUSERS = "diffusers"


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """One checkpoint as A1111 lists it in /sd-models, plus what the loader needs."""

    name: str
    filename: Path
    format: CheckpointFormat
    sha256: str
    legacy_hash: str
    architecture: Architecture
    config_folder: Path | None

    @property
    def model_name(self) -> str:
        stem = self.name.rsplit(".", 1)[0] if self.format is CheckpointFormat.SINGLE_FILE else self.name
        return stem.replace("/", "_").replace("\\", "_")

    @property
    def shorthash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]"

    @property
    def aliases(self) -> tuple[str, ...]:
        stem = self.name.rsplit(".", 1)[0]
        return (
            self.title,
            self.name,
            stem,
            self.model_name,
            self.shorthash,
            self.sha256,
            self.legacy_hash,
            f"{self.name} [{self.legacy_hash}]",
            f"{stem} [{self.shorthash}]",
        )


@dataclass(frozen=True, kw_only=True)
class AuxiliaryModel:
    """A VAE or LoRA file. `hash` is A1111's: whole-file sha256 for VAEs, AddNet (after-header) sha256 for LoRAs."""

    name: str
    filename: Path
    sha256: str
    metadata: dict[str, str]

    @property
    def shorthash(self) -> str:
        return self.sha256[:10]


# --------------------------------------------------------------------------------------------- safetensors headers


def read_safetensors_header(path: Path, *, max_header_bytes: int) -> dict[str, object]:
    """The JSON header of a .safetensors file, refused when larger than `max_header_bytes` before allocating it."""
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise CheckpointRefusedError(f"{path.name}: truncated safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > max_header_bytes:
                raise CheckpointRefusedError(
                    f"{path.name}: safetensors header of {length} bytes exceeds the cap of {max_header_bytes} bytes"
                )
            raw = handle.read(length)
    except OSError as error:
        raise CheckpointRefusedError(f"{path.name}: cannot read: {error}") from error
    if len(raw) != length:
        raise CheckpointRefusedError(f"{path.name}: truncated safetensors header")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointRefusedError(f"{path.name}: corrupt safetensors header: {error}") from error
    if not isinstance(header, dict):
        raise CheckpointRefusedError(f"{path.name}: corrupt safetensors header")
    return header


def tensor_shapes(header: dict[str, object]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for key, entry in header.items():
        if key != "__metadata__" and isinstance(entry, dict):
            shapes[key] = list(entry.get("shape", []))
    return shapes


def safetensors_metadata(header: dict[str, object]) -> dict[str, str]:
    metadata = header.get("__metadata__")
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


# ------------------------------------------------------------------------------------------------------- hashing


def file_sha256(path: Path, *, offset: int = 0) -> str:
    """sha256 of a file from `offset` on, with progress in the log for big files, cached in a sidecar file."""
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    stat = path.stat()
    cache_key = f"{offset}:{stat.st_size}:{stat.st_mtime_ns}"
    cached = _read_sidecar(sidecar)
    if cached.get(cache_key):
        return cached[cache_key]
    digest = hashlib.sha256()
    started = time.monotonic()
    done = 0
    last_report = started
    with path.open("rb") as handle:
        handle.seek(offset)
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
            done += len(block)
            if time.monotonic() - last_report > 2.0:
                last_report = time.monotonic()
                log.info("hashing %s: %d%%", path.name, 100 * done // max(1, stat.st_size - offset))
    value = digest.hexdigest()
    if stat.st_size > 64 * _HASH_BLOCK:
        log.info("hashed %s in %.1fs", path.name, time.monotonic() - started)
    try:
        sidecar.write_text(json.dumps({cache_key: value}), encoding="utf-8")
    except OSError:
        log.debug("models folder not writable: %s not cached", sidecar)
    return value


def _read_sidecar(sidecar: Path) -> dict[str, str]:
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def legacy_hash(path: Path) -> str:
    """A1111's pre-2023 "model hash": sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    with path.open("rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def folder_sha256(folder: Path) -> str:
    """A diffusers folder has no A1111 hash: we hash the sorted (path, file sha256) list of its weight files."""
    digest = hashlib.sha256()
    for weight in sorted(_weight_files(folder)):
        digest.update(weight.relative_to(folder).as_posix().encode())
        digest.update(file_sha256(weight).encode())
    return digest.hexdigest()


def _weight_files(folder: Path) -> Iterable[Path]:
    for pattern in ("*.safetensors", "*.bin"):
        yield from (p for p in folder.rglob(pattern) if p.is_file())


# ------------------------------------------------------------------------------------------------------ registry


def resolve_inside(base: Path, name: str) -> Path:
    """`base / name`, refused when it would leave `base` (path traversal, absolute paths, symlink escapes)."""
    candidate = (base / name).resolve()
    root = base.resolve()
    if candidate != root and root not in candidate.parents:
        raise CheckpointRefusedError(f"'{name}' is outside the models folder")
    return candidate


class CheckpointRegistry:
    """The models folder as A1111 sees it. `refresh()` rescans; lookups never touch paths outside the folder."""

    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._checkpoints: dict[str, CheckpointInfo] = {}
        self._aliases: dict[str, CheckpointInfo] = {}
        self._vaes: dict[str, AuxiliaryModel] = {}
        self._loras: dict[str, AuxiliaryModel] = {}
        self.refresh()

    # ---- queries
    def checkpoints(self) -> list[CheckpointInfo]:
        with self._lock:
            return sorted(self._checkpoints.values(), key=lambda info: info.name.lower())

    def vaes(self) -> list[AuxiliaryModel]:
        with self._lock:
            return sorted(self._vaes.values(), key=lambda vae: vae.name.lower())

    def loras(self) -> list[AuxiliaryModel]:
        with self._lock:
            return sorted(self._loras.values(), key=lambda lora: lora.name.lower())

    def resolve(self, alias: str, *, field: str = "sd_model_checkpoint") -> CheckpointInfo:
        """Any A1111 alias (title, name, stem, short/full/legacy hash, "stem [hash]") to its checkpoint."""
        with self._lock:
            found = self._aliases.get(alias.strip())
            titles = sorted(info.title for info in self._checkpoints.values())
        if found is None:
            raise CheckpointNotFoundError(field, f"model '{alias}' not found", valid_values=titles)
        return found

    def resolve_vae(self, name: str, *, field: str = "sd_vae") -> AuxiliaryModel | None:
        """A VAE file name (or stem); "Automatic"/"None"/"" mean the checkpoint's own VAE."""
        if name.strip() in ("", "Automatic", "None"):
            return None
        with self._lock:
            found = self._vaes.get(name) or next(
                (v for v in self._vaes.values() if v.name.rsplit(".", 1)[0] == name), None
            )
            names = sorted(self._vaes)
        if found is None:
            raise CheckpointNotFoundError(field, f"VAE '{name}' not found", valid_values=["Automatic", "None", *names])
        return found

    def find_lora(self, name: str) -> AuxiliaryModel | None:
        """A LoRA by file stem or alias (`ss_output_name`), or None: A1111 warns and goes on for unknown LoRAs."""
        with self._lock:
            by_stem = self._loras.get(name)
            if by_stem is not None:
                return by_stem
            return next((lora for lora in self._loras.values() if lora.metadata.get("ss_output_name") == name), None)

    # ---- scanning
    def refresh(self) -> None:
        checkpoints = self._scan_checkpoints()
        aliases: dict[str, CheckpointInfo] = {}
        for info in checkpoints:
            for alias in info.aliases:
                aliases.setdefault(alias, info)
        vaes = {vae.name: vae for vae in self._scan_files(self.config.vae_dir, addnet_hash=False)}
        loras = {lora.name.rsplit(".", 1)[0]: lora for lora in self._scan_files(self.config.lora_dir, addnet_hash=True)}
        with self._lock:
            self._checkpoints = {info.name: info for info in checkpoints}
            self._aliases = aliases
            self._vaes = vaes
            self._loras = loras
        log.info("models: %d checkpoints, %d VAEs, %d LoRAs", len(checkpoints), len(vaes), len(loras))

    def _scan_checkpoints(self) -> list[CheckpointInfo]:
        root = self.config.checkpoints_dir
        if not root.is_dir():
            return []
        found: list[CheckpointInfo] = []
        for path in _candidate_paths(root):
            try:
                info = self._inspect(root, path)
            except CheckpointRefusedError as error:
                log.warning("skipping %s: %s", path.relative_to(root), error)
                continue
            if info is not None:
                found.append(info)
        return found

    def _inspect(self, root: Path, path: Path) -> CheckpointInfo | None:
        name = path.relative_to(root).as_posix()
        if path.is_dir():
            if not (path / "model_index.json").is_file() or not any(_weight_files(path / "unet")):
                return None
            sha256 = folder_sha256(path)
            return CheckpointInfo(
                name=name,
                filename=path.resolve(),
                format=CheckpointFormat.DIFFUSERS,
                sha256=sha256,
                legacy_hash=sha256[:8],
                architecture=detect_config_folder(path),
                config_folder=path.resolve(),
            )
        suffix = path.suffix.lower()
        if suffix not in (".safetensors", ".ckpt"):
            return None
        if suffix == ".ckpt" and not self.config.allow_pickle:
            log.info("not listing %s: .ckpt files are pickles; set SD_ALLOW_PICKLE=1 to allow them", name)
            return None
        config_folder = path.with_name(path.stem + CONFIG_FOLDER_SUFFIX)
        explicit = config_folder if (config_folder / "model_index.json").is_file() else None
        if explicit is not None:
            architecture = detect_config_folder(explicit)
        else:
            hint = yaml_v_prediction_hint(path.with_suffix(".yaml"))
            architecture = detect_single_file(self._shapes(path), v_prediction_hint=hint)
        return CheckpointInfo(
            name=name,
            filename=path.resolve(),
            format=CheckpointFormat.SINGLE_FILE,
            sha256=file_sha256(path),
            legacy_hash=legacy_hash(path),
            architecture=architecture,
            config_folder=explicit.resolve() if explicit else None,
        )

    def _shapes(self, path: Path) -> dict[str, list[int]]:
        if path.suffix.lower() == ".safetensors":
            return tensor_shapes(read_safetensors_header(path, max_header_bytes=self.config.max_header_bytes))
        return pickle_tensor_shapes(path, allow_pickle=self.config.allow_pickle)

    def _scan_files(self, folder: Path, *, addnet_hash: bool) -> list[AuxiliaryModel]:
        if not folder.is_dir():
            return []
        found: list[AuxiliaryModel] = []
        for path in sorted(folder.rglob("*.safetensors")):
            try:
                header = read_safetensors_header(path, max_header_bytes=self.config.max_header_bytes)
            except CheckpointRefusedError as error:
                log.warning("skipping %s: %s", path.name, error)
                continue
            metadata = safetensors_metadata(header)
            header_end = 8 + struct.unpack("<Q", path.open("rb").read(8))[0]
            sha = metadata.get("sshs_model_hash") or file_sha256(path, offset=header_end if addnet_hash else 0)
            found.append(
                AuxiliaryModel(
                    name=path.relative_to(folder).as_posix(), filename=path.resolve(), sha256=sha, metadata=metadata
                )
            )
        return found


def _candidate_paths(folder: Path) -> Iterable[Path]:
    """Files and diffusers folders under `folder`; never descends into a diffusers folder, a `<stem>.config`
    folder or a hidden one."""
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name.endswith(CONFIG_FOLDER_SUFFIX):
            continue
        if path.is_dir() and not (path / "model_index.json").is_file():
            yield from _candidate_paths(path)
        else:
            yield path


def pickle_tensor_shapes(path: Path, *, allow_pickle: bool) -> dict[str, list[int]]:
    """Shapes of a .ckpt's tensors; only with SD_ALLOW_PICKLE=1, and even then with torch's weights_only loader."""
    if not allow_pickle:
        raise CheckpointRefusedError(f"{path.name}: .ckpt files are pickles; set SD_ALLOW_PICKLE=1 to load them")
    import torch

    try:
        data = torch.load(path, map_location="meta", weights_only=True)
    except Exception as error:
        raise CheckpointRefusedError(f"{path.name}: cannot read checkpoint: {error}") from error
    state = data.get("state_dict", data) if isinstance(data, dict) else {}
    return {str(k): list(v.shape) for k, v in state.items() if hasattr(v, "shape")}
