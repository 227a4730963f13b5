"""Read raw records (one dict per example) from local files, folders or the local HF cache.

Supported sources:

* ``.jsonl`` / ``.ndjson`` -- one JSON object per line (blank lines are skipped);
* ``.json`` -- one JSON list of objects;
* ``.csv`` -- comma-separated with a header row (``csv.DictReader``, standard quoting);
* ``.tsv`` -- tab-separated with a header row, read with ``quoting=csv.QUOTE_NONE`` because
  the GLUE files this targets contain unbalanced quote characters inside the text;
* a folder of such files, one file per split (``train.jsonl``, ``test.jsonl``, ``dev.tsv``...):
  ``split`` picks the file by its stem; ``None`` means the only data file, or ``train``;
* the name of a Hugging Face dataset that is already in the local ``datasets`` cache (needs the
  optional ``datasets`` package; lorakit never downloads).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from lorakit.data.format import DataFormatError

SUPPORTED_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")

# Names under which datasets commonly store the same split; a request for any name in a group
# matches a file named with any other name of that group (e.g. split="validation" finds dev.tsv).
_SPLIT_ALIASES = (
    ("validation", "valid", "val", "dev", "eval"),
    ("test",),
    ("train",),
)


def load_records(source: str | Path, split: str | None = None) -> list[dict]:
    """Return the records of a local data file, a folder of split files, or a cached HF dataset.

    Args:
        source: a ``.jsonl``/``.json``/``.csv``/``.tsv`` file, a folder holding one such file per
            split, or the name of a Hugging Face dataset already in the local cache.
        split: which split to read from a folder or HF dataset (``"train"``, ``"test"``,
            ``"validation"``/``"dev"`` ...). ``None`` reads a folder's only data file, or its
            ``train`` file, or an HF dataset's ``train`` split. Must be ``None`` for a file.

    Raises:
        FileNotFoundError: ``source`` looks like a path but does not exist.
        DataFormatError: the file cannot be parsed, holds no records, or a row is not an object.
        ValueError: ``split`` does not name an available split.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_file(_pick_split_file(path, split))
    if path.is_file():
        if split is not None:
            raise ValueError(
                f"split={split!r} was given but {str(path)!r} is a single file; split selects a "
                "file inside a folder or a split of a Hugging Face dataset. Drop split, or pass "
                "the folder that holds the split files."
            )
        return _read_file(path)
    if _looks_like_path(str(source)):
        raise FileNotFoundError(
            f"Data file or folder {str(path)!r} does not exist. Pass an existing "
            f"{'/'.join(SUPPORTED_SUFFIXES)} file or a folder of split files."
        )
    return _load_hf_dataset(str(source), split)


def _looks_like_path(source: str) -> bool:
    """True when ``source`` is meant as a filesystem path rather than an HF dataset name."""
    return (
        source.startswith((".", "/", "~"))
        or Path(source).suffix.lower() in SUPPORTED_SUFFIXES
        or source.count("/") > 1
        or "\\" in source
    )


def _pick_split_file(folder: Path, split: str | None) -> Path:
    """Return the data file in ``folder`` for ``split`` (see ``load_records``)."""
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
    )
    if not files:
        raise FileNotFoundError(
            f"Folder {str(folder)!r} holds no data file; expected files ending in "
            f"{', '.join(SUPPORTED_SUFFIXES)} (e.g. train.jsonl, test.jsonl)."
        )
    available = ", ".join(p.name for p in files)
    if split is None:
        if len(files) == 1:
            return files[0]
        split = "train"
        wanted = {"train"}
        reason = f"it holds several data files ({available}) and split=None means 'train'"
    else:
        wanted = next((set(g) for g in _SPLIT_ALIASES if split.lower() in g), {split.lower()})
        reason = f"split={split!r} was asked for"
    matches = [p for p in files if p.stem.lower() in wanted]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ValueError(
            f"Folder {str(folder)!r} has no file for split {split!r} ({reason}); its data files "
            f"are: {available}. Pass split= one of their names without extension."
        )
    raise ValueError(
        f"Folder {str(folder)!r} has several files for split {split!r}: "
        f"{', '.join(p.name for p in matches)}. Pass the file you mean directly."
    )


def _read_file(path: Path) -> list[dict]:
    """Parse one data file by its suffix and check it holds a non-empty list of objects."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        records = _read_jsonl(path)
    elif suffix == ".json":
        records = _read_json(path)
    elif suffix in (".csv", ".tsv"):
        records = _read_delimited(path, delimiter="," if suffix == ".csv" else "\t")
    else:
        raise DataFormatError(
            f"{str(path)!r} has an unsupported extension {suffix!r}; supported: "
            f"{', '.join(SUPPORTED_SUFFIXES)}."
        )
    if not records:
        raise DataFormatError(f"{str(path)!r} holds no records; it is empty.")
    return records


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(
                    f"{str(path)!r} line {line_number} is not valid JSON ({error.msg}); a .jsonl "
                    "file needs one JSON object per line."
                ) from error
            if not isinstance(record, dict):
                raise DataFormatError(
                    f"{str(path)!r} line {line_number} is a JSON {type(record).__name__}, not an "
                    "object; a .jsonl file needs one JSON object per line."
                )
            records.append(record)
    return records


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataFormatError(
            f"{str(path)!r} is not valid JSON ({error.msg} at line {error.lineno}). If it holds "
            "one object per line, name it .jsonl."
        ) from error
    if not isinstance(data, list):
        raise DataFormatError(
            f"{str(path)!r} holds a JSON {type(data).__name__}; expected a list of objects "
            "like [{\"prompt\": ..., \"response\": ...}, ...]."
        )
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataFormatError(
                f"{str(path)!r} item {index} is a JSON {type(record).__name__}, not an object; "
                "expected a list of objects."
            )
    return data


def _read_delimited(path: Path, delimiter: str) -> list[dict]:
    # Fields such as long passages can exceed csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
        if not reader.fieldnames:
            raise DataFormatError(
                f"{str(path)!r} has no header row; the first row must name the columns."
            )
        records = []
        for record in reader:
            if None in record or None in record.values():
                # DictReader files surplus cells under the key None, and fills missing ones
                # with None.
                raise DataFormatError(
                    f"{str(path)!r} line {reader.line_num} has a different number of cells "
                    f"than the header ({len(reader.fieldnames)} columns: "
                    f"{', '.join(reader.fieldnames)})."
                )
            records.append(record)
    return records


def _load_hf_dataset(name: str, split: str | None) -> list[dict]:
    """Read a Hugging Face dataset from the local cache only (needs the ``datasets`` package)."""
    try:
        import datasets  # optional dependency, imported only for this source type
    except ImportError:
        raise FileNotFoundError(
            f"{name!r} is not a local file or folder. Loading it as a Hugging Face dataset needs "
            "the optional `datasets` package, which is not installed. Pass a local "
            f"{'/'.join(SUPPORTED_SUFFIXES)} file or folder of split files instead, or "
            "`pip install datasets` and pre-populate its cache (lorakit never downloads)."
        ) from None

    # Force offline mode for this call only, so a cache miss fails instead of downloading.
    saved = {key: getattr(datasets.config, key) for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
             if hasattr(datasets.config, key)}
    for key in saved:
        setattr(datasets.config, key, True)
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as error:  # datasets raises many types (ConnectionError, ValueError, ...)
        raise FileNotFoundError(
            f"Could not load Hugging Face dataset {name!r} split {split or 'train'!r} from the "
            f"local cache: {type(error).__name__}: {error}. lorakit never downloads; "
            "pre-populate the cache with `datasets.load_dataset` on a machine with network access, "
            "or export the data to a local .jsonl file."
        ) from error
    finally:
        for key, value in saved.items():
            setattr(datasets.config, key, value)
    return [dict(row) for row in dataset]
