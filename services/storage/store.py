"""The model store on disk: imported HF checkpoints and their partition manifests.

Layout under the root:

    models/<name>/files/...                    the checkpoint folder (hard links when possible)
    models/<name>/model.json                   ModelInfo
    models/<name>/partitions/<degree>-<stage>.json   Manifest
    staging/                                   imports and deletions in progress

An import is assembled in staging/ and renamed into models/ in one step, so a model is either
wholly there or absent; a deletion renames it out first. Partition files themselves are never
written: the service assembles their bytes from the source files on every read.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import threading
import uuid
from pathlib import Path

from libs.common.errors import ConflictError, InvalidRequestError, ModelFormatError, NotFoundError
from services.storage.partitioner import Partition, Partitioner
from services.storage.schemas import FileInfo, Manifest, ManifestTensor, ModelInfo, StageInfo
from services.worker.engine.loader import checkpoint_files

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Besides the weights, an import keeps the top-level files a worker may read (config,
# tokenizer, chat template); other weight formats (.bin, .pth) and subfolders are left out.
_KEPT_SUFFIXES = frozenset({".json", ".jinja", ".txt", ".model", ".tiktoken"})
REQUIRED_FILES = ("config.json", "tokenizer.json")


def manifest_of(model: str, partition: Partition) -> Manifest:
    return Manifest(
        model=model, degree=partition.degree, stage=partition.stage,
        start_layer=partition.start_layer, end_layer=partition.end_layer,
        num_layers=partition.num_layers, num_bytes=partition.num_bytes,
        header_b64=base64.b64encode(partition.header).decode(),
        tensors=[ManifestTensor(name=e.name, file=e.file, src_start=e.src_start,
                                src_end=e.src_end, dtype=e.dtype, shape=list(e.shape),
                                dst_start=e.dst_start) for e in partition.tensors],
    )


class ModelStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._models = self.root / "models"
        self._staging = self.root / "staging"
        self._models.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        for leftover in self._staging.iterdir():  # an import or delete cut short by a crash
            logger.warning("removing unfinished %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        # handlers run in a thread pool; the caches are filled lazily from disk
        self._lock = threading.Lock()
        self._infos: dict[str, ModelInfo] = {}
        self._manifests: dict[tuple[str, int, int], Manifest] = {}

    # --- import and delete -----------------------------------------------------------------
    def import_model(self, src_dir: str | Path, name: str) -> ModelInfo:
        """Validate an HF folder, partition it, and add it to the store under `name`."""
        _check_name(name)
        src = Path(src_dir)
        if not src.is_dir():
            raise ModelFormatError(f"model folder {str(src)!r} does not exist", param="path")
        partitioner = Partitioner(src)  # config, architecture, weights, tensor shapes
        for required in REQUIRED_FILES:
            if not (src / required).is_file():
                raise ModelFormatError(f"model folder {str(src)!r} has no {required}",
                                       param="path")
        if (self._models / name).exists():
            raise ConflictError(f"model {name!r} already exists", param="name")
        staging = self._staging / f"import-{name}-{uuid.uuid4().hex[:8]}"
        try:
            files = _stage_files(src, staging / "files")
            info = self._write_partitions(staging, name, partitioner, files)
            try:
                os.rename(staging, self._models / name)
            except OSError as exc:  # another import of the same name won the race
                raise ConflictError(f"model {name!r} already exists", param="name") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("imported model %s from %s (%d layers, %d bytes)", name, src,
                    info.num_layers, info.num_bytes)
        return info

    def delete(self, name: str) -> None:
        path = self._model_dir(name)
        doomed = self._staging / f"delete-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(path, doomed)  # gone for readers at once; open files stay readable
        with self._lock:
            self._infos.pop(name, None)
            for key in [k for k in self._manifests if k[0] == name]:
                del self._manifests[key]
        shutil.rmtree(doomed)

    # --- reads -------------------------------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        names = sorted(p.name for p in self._models.iterdir() if p.is_dir())
        return [self.describe(name) for name in names]

    def describe(self, name: str) -> ModelInfo:
        with self._lock:
            if name in self._infos:
                return self._infos[name]
        info = ModelInfo.model_validate_json((self._model_dir(name) / "model.json").read_bytes())
        with self._lock:
            self._infos[name] = info
        return info

    def manifest(self, name: str, degree: int, stage: int) -> Manifest:
        key = (name, degree, stage)
        with self._lock:
            if key in self._manifests:
                return self._manifests[key]
        path = self._model_dir(name) / "partitions" / f"{degree}-{stage}.json"
        if not path.is_file():
            raise NotFoundError(f"model {name!r} has no stage {stage} at pipeline degree "
                                f"{degree} (max degree {self.describe(name).max_degree})")
        manifest = Manifest.model_validate_json(path.read_bytes())
        with self._lock:
            self._manifests[key] = manifest
        return manifest

    def files_dir(self, name: str) -> Path:
        return self._model_dir(name) / "files"

    def file_path(self, name: str, path: str) -> Path:
        """A file of the model's folder, by its listed name only (no path traversal)."""
        if path not in {f.path for f in self.describe(name).files}:
            raise NotFoundError(f"model {name!r} has no file {path!r}", param="path")
        return self.files_dir(name) / path

    # --- helpers -----------------------------------------------------------------------------
    def _model_dir(self, name: str) -> Path:
        _check_name(name)
        path = self._models / name
        if not path.is_dir():
            raise NotFoundError(f"model {name!r} does not exist", param="name")
        return path

    def _write_partitions(self, staging: Path, name: str, partitioner: Partitioner,
                          files: list[FileInfo]) -> ModelInfo:
        (staging / "partitions").mkdir()
        stages: dict[str, list[StageInfo]] = {}
        for degree in range(1, partitioner.max_degree + 1):
            stages[str(degree)] = []
            for partition in partitioner.partitions(degree):
                manifest = manifest_of(name, partition)
                path = staging / "partitions" / f"{degree}-{partition.stage}.json"
                path.write_text(manifest.model_dump_json())
                stages[str(degree)].append(StageInfo(
                    stage=partition.stage, start_layer=partition.start_layer,
                    end_layer=partition.end_layer, num_bytes=partition.num_bytes))
        config = partitioner.config
        info = ModelInfo(
            name=name, architecture=config.architecture, family=config.family,
            num_layers=config.num_layers,
            dtype=str(config.checkpoint_dtype).removeprefix("torch."),
            num_bytes=partitioner.num_bytes, max_degree=partitioner.max_degree,
            files=files, partitions=stages,
        )
        (staging / "model.json").write_text(info.model_dump_json(indent=1))
        return info


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise InvalidRequestError(
            f"model name {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit", param="name")


def _stage_files(src: Path, dest: Path) -> list[FileInfo]:
    """Hard-link (or copy, across file systems) the folder's kept files into `dest`."""
    dest.mkdir(parents=True)
    weights = {p.name for p in checkpoint_files(src)}
    names = sorted(p.name for p in src.iterdir() if p.is_file()
                   and (p.name in weights or p.suffix in _KEPT_SUFFIXES))
    files = []
    for file_name in names:
        source, target = src / file_name, dest / file_name
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
        files.append(FileInfo(path=file_name, num_bytes=target.stat().st_size))
    return files
