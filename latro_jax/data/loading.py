"""Rows from a hub id or local files through HF `datasets`, parsed into Examples with row-level
errors, and a deterministic shuffled batch iterator whose position can be saved and restored
and which gives each process only its share of the global batch."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from latro_jax.data.synthetic import generate_splits
from latro_jax.data.tasks import DataError, Example, Task

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def _local_file(source: str, split: str) -> str | None:
    """`source` itself if it is a file, else `<source>/<split>.<ext>` for a known extension."""
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        for ext in BUILDERS:
            path = os.path.join(source, split + ext)
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(f"{source}: no {split}.jsonl/.json/.parquet/.arrow file for split "
                                f"{split!r}; name the file directly or set the split.")
    return None


def load_rows(source: str, split: str, *, config_name: str | None = None):
    """A `datasets.Dataset` of raw rows: a local file, a folder holding `<split>.<ext>`, or a hub
    id (with optional config name, e.g. "openai/gsm8k", "main")."""
    import datasets
    path = _local_file(source, split)
    if path is not None:
        ext = os.path.splitext(path)[1]
        if ext not in BUILDERS:
            raise DataError(f"{path}: unsupported data file type {ext!r}; use one of {sorted(BUILDERS)}")
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: the file is empty; check the data source and split.")
        if BUILDERS[ext] == "json":
            _check_utf8(path)
        try:
            return datasets.load_dataset(BUILDERS[ext], data_files=path, split="train")
        except Exception as e:  # noqa: BLE001 - datasets wraps parse errors in its own
            raise DataError(f"{path}: cannot read it as {BUILDERS[ext]} ({_bad_json_line(path) or e}).") from e
    if source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"{source}: no such data file or folder.")
    try:
        return datasets.load_dataset(source, config_name, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure gets the same advice
        raise FileNotFoundError(f"{source!r} is not a local data file or folder and could not be "
                                f"loaded from the hub ({type(e).__name__}: {e}). Point the data "
                                "source at local jsonl/json/parquet/arrow files.") from e


def _check_utf8(path: str) -> None:
    """Refuse a text file with bytes that are not UTF-8, naming the first such line."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {n} has bytes that are not UTF-8 ({line[e.start:e.end]!r} at "
                                f"byte {e.start + 1} of the line); re-encode the file as UTF-8.") from e


def _bad_json_line(path: str) -> str | None:
    """'line N is not valid JSON: ...' for the first bad line of a .jsonl file, else None."""
    if not path.endswith(".jsonl"):
        return None
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                if line.strip():
                    json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n} is not valid JSON: {e.msg} at column {e.colno}"
    return None


def load_examples(task: Task, source: str, split: str, *, config_name: str | None = None,
                  limit: int | None = None, synthetic: Mapping[str, Any] | None = None) -> list[Example]:
    """Parse every row of a split into Examples (a bad row is an error naming file and row).
    source "synthetic" generates the synthetic task's split from `synthetic` =
    {seed, sizes: {split: n}, num_steps, max_operand}."""
    if source == "synthetic":
        knobs = dict(synthetic or {})
        rows = generate_splits(knobs.pop("seed", 0), knobs.pop("sizes", {split: limit or 1000}), **knobs)
        if split not in rows:
            raise ValueError(f"synthetic task: no size given for split {split!r}")
        rows, where = rows[split], f"synthetic:{split}"
    else:
        rows = load_rows(source, split, config_name=config_name)
        where = _local_file(source, split) or f"{source}[{split}]"
    if limit is not None:
        rows = rows[:limit] if isinstance(rows, list) else rows.select(range(min(limit, len(rows))))
    examples = [task.example(row, f"{where}: row {i + 1}") for i, row in enumerate(rows)]
    if not examples:
        raise DataError(f"{where}: no rows; check the data source and split.")
    return examples


class BatchIterator:
    """Batches of example indices: each epoch a fresh permutation of (seed, epoch); a global batch
    of `global_batch` indices per step (the remainder of an epoch is dropped), of which this
    process gets the contiguous share `process_index` of `process_count`."""

    def __init__(self, num_examples: int, global_batch: int, *, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1):
        if global_batch < 1 or global_batch > num_examples:
            raise ValueError(f"global batch {global_batch} must be in [1, {num_examples}] (the number of examples)")
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        self.n, self.batch, self.seed, self.shuffle = num_examples, global_batch, seed, shuffle
        self.share = slice(process_index * global_batch // process_count,
                           (process_index + 1) * global_batch // process_count)
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self) -> list[int]:
        if self.position + self.batch > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._order()[self.position:self.position + self.batch]
        self.position += self.batch
        return batch[self.share].tolist()

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def select(examples: Sequence[Example], indices: Sequence[int]) -> list[Example]:
    return [examples[i] for i in indices]
