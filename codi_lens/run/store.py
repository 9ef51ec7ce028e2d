"""The result store: resumable, kill-safe output folders that refuse stale results.

A :class:`ResultStore` owns one output folder::

    DIR/run.json        the settings that change a result (checkpoint content hash, data, budget,
                        interventions, ...) and the package version
    DIR/parts/*.parquet results as they are produced, one file per batch of units of work, each
                        written to a temporary name and renamed (atomic), carrying the ids of the
                        units it finished in its metadata (so a unit that yields no row is done too)
    DIR/results.parquet the consolidated table, written by :meth:`ResultStore.finish`

Opening a folder whose ``run.json`` holds different settings raises :class:`SettingsMismatchError`
naming each differing setting (``overwrite=True`` starts afresh). After ``kill -9`` at any moment,
running the same work again skips the units already in a part and computes the rest, so the final
table holds every unit exactly once and equals an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from codi_lens.core.errors import CodiLensError
from codi_lens.core.model import CODIModel
from codi_lens.run.executors import Executor, LocalExecutor

Unit = TypeVar("Unit")
UNITS_KEY = b"codi_lens.units"
UNIT_COLUMN = "unit_id"


class SettingsMismatchError(CodiLensError, ValueError):
    """An output folder holds results made with different settings."""


def package_version() -> str:
    try:
        return metadata.version("codi-lens")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _normalise(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(settings, default=str, sort_keys=True))


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key (value there, value now)`` for every (dotted, nested) setting that differs."""
    saved, current = _flatten(saved), _flatten(current)
    missing = object()
    return [
        f"{key} ({saved.get(key, 'absent')!r} there, {current.get(key, 'absent')!r} now)"
        for key in sorted(set(saved) | set(current))
        if saved.get(key, missing) != current.get(key, missing)
    ]


class ResultStore:
    """One resumable output folder (see the module docstring).

    Args:
        directory: the output folder (created if needed).
        settings: every setting that changes a result; JSON-serialisable (paths are written as strings).
        overwrite: delete earlier results in ``directory`` instead of refusing different settings.
    """

    def __init__(self, directory: str | Path, settings: dict[str, Any], *, overwrite: bool = False):
        self.directory = Path(directory)
        self.parts = self.directory / "parts"
        self.settings = _normalise(settings)
        run_file = self.directory / "run.json"
        if overwrite and self.directory.exists():
            shutil.rmtree(self.parts, ignore_errors=True)
            for name in ("run.json", "results.parquet", "summary.json"):
                (self.directory / name).unlink(missing_ok=True)
        if run_file.exists():
            saved = json.loads(run_file.read_text()).get("settings", {})
            changed = differing_settings(saved, self.settings)
            if changed:
                raise SettingsMismatchError(
                    f"{run_file} was written with different settings: {'; '.join(changed)}. "
                    "Use another output folder, or --overwrite to start afresh"
                )
        self.parts.mkdir(parents=True, exist_ok=True)
        for leftover in self.parts.glob(".tmp-*"):  # a part being written when the run was killed
            leftover.unlink()
        if not run_file.exists():
            record = {"settings": self.settings, "package_version": package_version()}
            _write_atomic(run_file, json.dumps(record, indent=2).encode())

    # ------------------------------------------------------------------ parts
    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet"))

    def done(self) -> set[str]:
        """Ids of the units finished in earlier parts."""
        finished: set[str] = set()
        for path in self._part_files():
            meta = pq.read_schema(path).metadata or {}
            finished.update(json.loads(meta.get(UNITS_KEY, b"[]")))
        return finished

    def write_part(self, unit_ids: Sequence[str], frame: pd.DataFrame) -> Path:
        """Write the rows of the finished ``unit_ids`` as one part (atomically)."""
        if len(frame) and UNIT_COLUMN not in frame:
            raise ValueError(f"a results frame needs a {UNIT_COLUMN!r} column naming each row's unit")
        table = pa.Table.from_pandas(frame, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), UNITS_KEY: json.dumps(list(unit_ids))})
        name = f"part-{len(self._part_files()):06d}-{uuid.uuid4().hex[:8]}.parquet"
        temporary = self.parts / f".tmp-{name}"
        pq.write_table(table, temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        temporary.replace(self.parts / name)
        return self.parts / name

    def rows(self) -> pd.DataFrame:
        """Every row written so far, in the order the parts were written (see :func:`read_parts`)."""
        frames = [table.to_pandas() for table in read_parts(self.parts)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    # ------------------------------------------------------------------ running
    def run(
        self,
        units: Sequence[Unit],
        work: Callable[[list[Unit]], pd.DataFrame],
        *,
        unit_id: Callable[[Unit], str],
        batch_size: int,
        desc: str = "units",
        progress: bool = True,
        executor: Executor | None = None,
        collect: bool = True,
        size: Callable[[Unit], int] | None = None,
        unit: str = "unit",
        model: CODIModel | None = None,
    ) -> pd.DataFrame:
        """Compute every unit not yet done, ``batch_size`` at a time, writing a part per batch.

        ``work(batch)`` returns the batch's rows with a ``unit_id`` column (any number of rows per
        unit, none included). ``executor`` decides where batches run (default: here, in order; a
        :class:`~codi_lens.run.executors.RayExecutor` runs them as Ray tasks, and parts are written as
        they come back). Returns the rows of ``units`` (earlier and new), in unit order; with
        ``collect=False`` nothing is read back (for tables too large to hold) and an empty frame is returned.

        Progress counts the work that takes the time: ``size(unit)`` pieces of it per unit (branches,
        cells, ...; named ``unit``), and, with ``model`` computing here, every forward pass of the batch
        being computed (its rows and passes in the bar's postfix), so the bar moves within a long batch.
        Before the work the plan is printed (units, pieces, batches); after the first batch, its time and
        the estimate for the rest.
        """
        ids = [unit_id(u) for u in units]
        if len(set(ids)) != len(ids):
            duplicated = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"unit ids must be unique; repeated: {duplicated}")
        finished = self.done()
        todo = [u for u, i in zip(units, ids) if i not in finished]
        weight = size or (lambda _: 1)
        batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        total, remaining = sum(weight(u) for u in units), sum(weight(u) for u in todo)
        executor = executor or LocalExecutor()
        with WorkBar(total, total - remaining, desc=desc, unit=unit, disable=not progress) as bar:
            if todo:
                bar.say(
                    f"plan: {desc}: {len(todo)} of {len(units)} units to compute ({remaining} {plural(unit)}) in "
                    f"{len(batches)} batch(es) of up to {batch_size}; an estimate follows the first batch"
                )
            listening = isinstance(model, CODIModel) and executor.in_process
            for index, frame in executor.map(_listened(work, model, bar) if listening else work, batches):
                batch = batches[index]
                batch_ids = [unit_id(u) for u in batch]
                unexpected = set(frame[UNIT_COLUMN]) - set(batch_ids) if len(frame) else set()
                if unexpected:
                    raise ValueError(f"work returned rows for units outside its batch: {sorted(unexpected)[:5]}")
                self.write_part(batch_ids, frame)
                bar.finish_batch(sum(weight(u) for u in batch))
        if not collect:
            return pd.DataFrame()
        rows = self.rows()
        if rows.empty:
            return rows
        order = {i: n for n, i in enumerate(ids)}
        rows = rows[rows[UNIT_COLUMN].isin(order)]
        return rows.sort_values(UNIT_COLUMN, key=lambda s: s.map(order), kind="stable").reset_index(drop=True)

    def finish(self, table: pd.DataFrame | None = None, summary: dict | None = None) -> pd.DataFrame:
        """Write ``results.parquet`` (the given table, or every row) and ``summary.json``."""
        table = self.rows() if table is None else table
        table.to_parquet(self.directory / "results.parquet", index=False)
        if summary is not None:
            _write_atomic(self.directory / "summary.json", json.dumps(summary, indent=2, default=str).encode())
        return table


class WorkBar:
    """A tqdm bar over pieces of work, told each forward pass of the batch being computed (:meth:`forward`) so it
    moves within a long batch; it prints the time of the first batch and the estimate for the rest."""

    def __init__(self, total: int, initial: int, *, desc: str, unit: str, disable: bool):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable)
        self.disable, self.unit = disable, unit
        self.started = time.perf_counter()
        self.batches = self.forwards = self.rows = 0
        self.last_shown = 0.0

    def __enter__(self) -> WorkBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def say(self, line: str) -> None:
        if not self.disable:
            tqdm.write(line, file=sys.stderr)

    def forward(self, rows: int, block: int) -> None:
        """Transformer block ``block`` of a forward pass over ``rows`` rows finished (block 0 starts a pass):
        show the pass and the layer (at most once a second)."""
        if block == 0:
            self.forwards += 1
            self.rows += rows
        now = time.perf_counter()
        if now - self.last_shown >= 1.0:
            self.last_shown = now
            self.bar.set_postfix_str(
                f"batch {self.batches + 1}: forward pass {self.forwards} ({rows} rows), layer {block + 1}", refresh=True
            )

    def finish_batch(self, pieces: int) -> None:
        self.batches += 1
        self.forwards = 0
        self.bar.set_postfix_str(f"{self.batches} batch(es) done", refresh=False)
        self.bar.update(pieces)
        if self.batches == 1 and self.bar.total > self.bar.n:
            seconds = time.perf_counter() - self.started
            left = (self.bar.total - self.bar.n) * seconds / max(pieces, 1)
            self.say(
                f"first batch: {pieces} {plural(self.unit)} in {seconds:.0f} s on this device; about "
                f"{left / 60:.1f} min for the remaining {self.bar.total - self.bar.n}"
            )


def batches_heard(
    items: Sequence[Unit], batch_size: int, *, model: CODIModel, desc: str, unit: str = "problem", progress: bool = True
) -> Iterator[list[Unit]]:
    """``items`` ``batch_size`` at a time, under a :class:`WorkBar` over the items that ``model`` tells of every
    transformer block while the caller computes a batch (so the bar moves within a long batch, and the first
    batch's time and the estimate for the rest are printed). The bar counts a batch done when the caller asks
    for the next one::

        for batch in batches_heard(questions, 16, model=model, desc="baseline"):
            parts.append(work(batch))
    """
    with WorkBar(len(items), 0, desc=desc, unit=unit, disable=not progress) as bar, model.listening(bar.forward):
        for start in range(0, len(items), batch_size):
            batch = list(items[start : start + batch_size])
            yield batch
            bar.finish_batch(len(batch))


def plural(noun: str) -> str:
    """``branch`` -> ``branches``, ``cell`` -> ``cells``."""
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def _listened(work: Callable[[list[Any]], pd.DataFrame], model: CODIModel, bar: WorkBar):
    def listened(batch: list[Any]) -> pd.DataFrame:
        with model.listening(bar.forward):
            return work(batch)

    return listened


def read_parts(
    parts: str | Path, *, columns: Sequence[str] | None = None, where: pc.Expression | None = None
) -> Iterator[pa.Table]:
    """The rows of each part of a ``parts/`` folder that has any, in the order the parts were written:
    only ``columns`` (and ``unit_id``) when given, only the rows matching the pyarrow expression
    ``where`` when given. A unit found in two parts (two workers racing on one folder) keeps the rows of
    its first part only."""
    seen: set[str] = set()
    for path in sorted(Path(parts).glob("part-*.parquet")):
        schema = pq.read_schema(path)
        units = json.loads((schema.metadata or {}).get(UNITS_KEY, b"[]"))
        fresh = [u for u in units if u not in seen]
        seen.update(units)
        if not fresh or UNIT_COLUMN not in schema.names:  # nothing new, or a part of units without rows
            continue
        wanted = None if columns is None else list(dict.fromkeys([UNIT_COLUMN, *columns]))
        table = pq.read_table(path, columns=wanted, filters=where)
        table = table.filter(pc.is_in(table[UNIT_COLUMN], value_set=pa.array(fresh, type=pa.string())))
        if table.num_rows:
            yield table


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".tmp-{path.name}")
    temporary.write_bytes(data)
    temporary.replace(path)
