"""Training checkpoints that a kill at any moment cannot leave half-written or half-deleted.

transformers.Trainer writes `checkpoint-N/` file by file in place and deletes old checkpoints
with `rmtree`, so a SIGKILL during a save leaves a newest `checkpoint-N` that resuming picks and
cannot load, while the intact one before it is ignored. Here:

- a checkpoint is written in a staging folder `checkpoints/.checkpoint-N.lorakit-tmp-staging/`
  (lorakit's hidden temporary names, which no reader takes for a checkpoint); when every file is
  there, each file and folder is fsynced, a manifest listing every file with its size and sha256
  is written last, and the folder is renamed to `checkpoint-N` (one atomic rename; the parent
  folder is fsynced after it);
- a checkpoint is complete only when its manifest verifies, so a folder that lost files (a power
  cut before the data reached disk, an interrupted copy of the run folder) is skipped too;
- old checkpoints are removed only after the new one is published, by renaming each to a
  temporary name first (atomic) and deleting that, so a kill mid-delete leaves a folder no reader
  takes for a checkpoint; leftover staging and trash folders are removed when the next run in the
  folder starts (it holds the run folder's lock, so no writer can still be using them).

Runs written before checkpoints had manifests are judged by reading their files instead (every
JSON parses, the safetensors file is whole, every torch file is a complete zip).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import IO

from safetensors import SafetensorError, safe_open

from lorakit.core.errors import ConfigError
from lorakit.core.io import TEMP_MARK, atomic_write_json, fsync_folder, remove_stale_temps, temp_path_for

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, run folders go unlocked
    fcntl = None

MANIFEST_NAME = "lorakit_checkpoint.json"
MANIFEST_FORMAT = 1
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR + "-N"
# What a checkpoint of ours always holds, whichever optimizer or parallelism wrote the rest.
REQUIRED_FILES = ("trainer_state.json", "adapter_config.json", "adapter_model.safetensors")
LOCK_NAME = ".lorakit-train.lock"


def checkpoint_folders(checkpoints: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` folder under `checkpoints`, oldest step first."""
    if not checkpoints.is_dir():
        return []
    found = []
    for entry in checkpoints.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def staging_folder(target: Path) -> Path:
    """Where checkpoint `target` is assembled: one name for every process of a distributed run
    (each writes its own RNG state into it), hidden and marked temporary like lorakit's other temps."""
    return target.parent / f".{target.name}{TEMP_MARK}staging"


def _files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def _sha256(handle: IO[bytes]) -> str:
    return hashlib.file_digest(handle, "sha256").hexdigest()


def publish_checkpoint(staged: Path, target: Path) -> None:
    """Make the fully written checkpoint folder `staged` durable, write its manifest last and
    rename it to `target` (replacing a checkpoint of the same step left by a run resumed earlier)."""
    listing = {}
    for path in _files(staged):
        with open(path, "rb") as handle:
            listing[path.relative_to(staged).as_posix()] = {"bytes": os.fstat(handle.fileno()).st_size,
                                                             "sha256": _sha256(handle)}
            os.fsync(handle.fileno())  # Trainer's torch.save / json writes are not fsynced
    step = CHECKPOINT_PATTERN.match(target.name)
    atomic_write_json(staged / MANIFEST_NAME, {"format": MANIFEST_FORMAT, "step": int(step.group(1)) if step else None,
                                               "files": listing})
    for folder in sorted({path.parent for path in _files(staged)}, key=lambda p: len(p.parts), reverse=True):
        fsync_folder(folder)
    if target.exists():
        discard(target)
    os.replace(staged, target)
    fsync_folder(target.parent)


def discard(folder: Path) -> None:
    """Delete `folder` so that a kill part way never leaves a half-deleted folder under its name."""
    trash = temp_path_for(folder, "trash")
    os.replace(folder, trash)
    fsync_folder(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(checkpoints: Path) -> list[Path]:
    """Remove the staging and trash folders a killed run left, however recent: call it only while
    holding the run folder's lock (no other writer). Returns what was removed."""
    return remove_stale_temps(checkpoints, max_age_s=0) if checkpoints.is_dir() else []


def checkpoint_problem(folder: Path, *, verify_hashes: bool = True, legacy: bool = False) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when it is. `legacy`: judge a folder
    without a manifest (written before lorakit wrote them) by reading its files instead."""
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        if legacy:
            return _legacy_problem(folder)
        return (f"it has no {MANIFEST_NAME}, which lorakit writes last "
                "(the save was interrupted, or the folder was copied in part)")
    try:
        manifest = json.loads(manifest_path.read_text())
        listing = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(listing, dict):
            return f"{MANIFEST_NAME} has format {manifest.get('format')!r}; this lorakit reads format {MANIFEST_FORMAT}"
        entries = [(name, int(entry["bytes"]), str(entry["sha256"])) for name, entry in listing.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST_NAME} is unreadable ({type(err).__name__}: {err})"
    step = CHECKPOINT_PATTERN.match(folder.name)
    if step and manifest.get("step") != int(step.group(1)):
        return f"its {MANIFEST_NAME} is for step {manifest.get('step')!r} (a checkpoint copied under another name)"
    missing_required = [name for name in REQUIRED_FILES if name not in listing]
    if missing_required:
        return f"{MANIFEST_NAME} does not list {', '.join(missing_required)}"
    for name, size, digest in entries:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        found = path.stat().st_size
        if found != size:
            return f"{name} has {found} bytes, its manifest says {size} (truncated or rewritten)"
        if verify_hashes:
            with open(path, "rb") as handle:
                if _sha256(handle) != digest:
                    return f"{name} does not match the sha256 in its manifest (the file was changed or corrupted)"
    return None


def _legacy_problem(folder: Path) -> str | None:
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            return f"{name} is missing"
    for path in _files(folder):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt"):
                    pass
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:  # torch.save's format; a cut-off file has no directory
                    if archive.testzip() is not None:
                        return f"{path.name} fails its CRC check"
        except (OSError, ValueError, SafetensorError, zipfile.BadZipFile) as err:
            return f"{path.relative_to(folder)} is incomplete or corrupt ({type(err).__name__})"
    return None


@dataclasses.dataclass
class CheckpointChoice:
    """The newest complete checkpoint (None: there is none) and the newer folders skipped, with why."""

    chosen: Path | None
    skipped: list[tuple[Path, str]]


def newest_complete_checkpoint(checkpoints: Path) -> CheckpointChoice:
    folders = checkpoint_folders(checkpoints)
    # A run whose checkpoints have no manifest at all was written by an older lorakit.
    legacy = not any((folder / MANIFEST_NAME).is_file() for _, folder in folders)
    skipped = []
    for _, folder in reversed(folders):
        problem = checkpoint_problem(folder, legacy=legacy)
        if problem is None:
            return CheckpointChoice(folder, skipped)
        skipped.append((folder, problem))
    return CheckpointChoice(None, skipped)


def rotate_checkpoints(checkpoints: Path, keep: int | None) -> None:
    """Keep the `keep` newest complete checkpoints; delete every checkpoint folder older than them.
    Only complete ones count, so the last complete checkpoint is never deleted for a broken one."""
    if not keep or keep <= 0:
        return
    folders = checkpoint_folders(checkpoints)
    complete = [step for step, folder in folders if checkpoint_problem(folder, verify_hashes=False) is None]
    if len(complete) <= keep:
        return
    oldest_kept = complete[-keep]
    for step, folder in folders:
        if step < oldest_kept:
            discard(folder)


class RunLock:
    """An exclusive lock on a run folder while a `lorakit train` writes it: a second run into the
    same folder would interleave its checkpoints with ours. The kernel drops the lock when the
    process dies, even by SIGKILL, so a killed run never leaves the folder locked."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._handle: IO[str] | None = None

    def __enter__(self) -> "RunLock":
        if fcntl is None:
            return self
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ConfigError(
                f"another lorakit train (pid {holder}) is writing {str(self.path.parent)!r}; wait for it to finish "
                "or stop it, or pass another --output-dir"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            self._handle.close()  # closing releases the lock
            self._handle = None
