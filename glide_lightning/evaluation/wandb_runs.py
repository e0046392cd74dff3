"""Read a wandb run back from its local files, offline runs included, without a server.

wandb (0.2x-0.3x) writes every run, online or offline, to ``<run folder>/run-<id>.wandb``: a
LevelDB-style log of its own ``Record`` protocol buffers (``wandb.proto.wandb_internal_pb2``), and
media (Tables, images) as JSON/PNG files under ``files/``. wandb itself no longer ships a Python
reader of that log (``wandb sync`` reads it in its Go core), so this is one: the framing below,
then wandb's own protobuf classes for each record. The dashboard picture in ``docs/`` and the tests
read runs back through it.

The log framing (wandb's ``datastore`` format, after LevelDB's ``log_format``): a 7-byte file
header (``:W&B``, the magic 0xBEE1 little-endian, version 0), then 32 KiB blocks of records, each
with a 7-byte header: CRC-32 of the type byte and the data (little-endian u32), data length (u16),
type (1 full, 2 first, 3 middle, 4 last fragment). A block's tail shorter than a header is zero
padding. A writer killed mid-write (or a file system that zero-fills what it had extended) leaves a torn tail,
which :func:`records` reads up to, warning; damage followed by readable records raises.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4

log = logging.getLogger(__name__)


def records(path: str | Path) -> Iterator[Any]:
    """The ``wandb_internal_pb2.Record`` messages of one ``.wandb`` file, in the order written.

    A torn tail (what a writer killed mid-write leaves: a record cut off by the end of the file, or zero bytes where
    the filesystem had extended or preallocated the file) ends the reading: every complete record before it is
    read, and a warning names the file and the byte where the unreadable tail begins. Damage with readable records
    after it is no torn write: it raises rather than skip the records in between.

    Raises:
        ValueError: not a wandb run log, or a damaged record (a checksum that does not match, a record type or
            length that cannot be) followed by readable records; the message names the file and the byte.
    """
    from wandb.proto import wandb_internal_pb2

    for payload in _payloads(Path(path)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _payloads(path: Path) -> Iterator[bytes]:
    """The records' bytes (fragments joined) of the log at ``path``; stops at a torn tail (see :func:`records`)."""
    data = path.read_bytes()
    if not data.startswith(HEADER):
        raise ValueError(f"{path} is not a wandb run log (no ':W&B' header)")
    pos, start, pending = len(HEADER), len(HEADER), None  # start: where the record being joined (pending) began
    while pos < len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER and not data[pos:pos + left_in_block].strip(b"\0"):
            pos += left_in_block  # no room for a header: zero padding to the next block
            continue
        problem = _problem(data, pos, pending is not None)
        if problem:
            _damaged(path, data, pos, start if pending is not None else pos, problem)
            return
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + RECORD_HEADER:pos + RECORD_HEADER + length]
        if kind in (FULL, FIRST):
            start, pending = pos, chunk
        else:
            pending = (pending or b"") + chunk
        pos += RECORD_HEADER + length
        if kind in (FULL, LAST):
            yield pending
            pending = None
    if pending is not None:
        _damaged(path, data, pos, start, "a record whose last fragment is missing")


def _problem(data: bytes, pos: int, joining: bool) -> str | None:
    """Why the record (fragment) at ``pos`` cannot be read, or None; ``joining``: a record's first fragment is read."""
    left_in_block = BLOCK - pos % BLOCK
    if left_in_block < RECORD_HEADER:
        return "non-zero block padding"
    if pos + RECORD_HEADER > len(data):
        return "a record header cut short by the end of the file"
    checksum, length, kind = struct.unpack_from("<IHB", data, pos)
    if checksum == length == kind == 0:
        return "zero bytes where a record header belongs"
    if kind not in (FULL, FIRST, MIDDLE, LAST):
        return f"a record of unknown type {kind}"
    if RECORD_HEADER + length > left_in_block:
        return f"a record of {length} bytes where its block has {left_in_block - RECORD_HEADER} left"
    if pos + RECORD_HEADER + length > len(data):
        return f"a record of {length} bytes cut short by the end of the file"
    if zlib.crc32(data[pos + RECORD_HEADER - 1:pos + RECORD_HEADER + length]) != checksum:  # type byte and data
        return "a record that fails its checksum"
    if (kind in (MIDDLE, LAST)) != joining:
        return "a record fragment out of order"
    return None


def _damaged(path: Path, data: bytes, pos: int, tail: int, problem: str) -> None:
    """What is at ``pos`` cannot be read (``problem``; the record it belongs to began at ``tail``): a torn tail
    (warned about, the reading stops) unless a readable record follows, somewhere after ``pos``: then raise."""
    resumes = _next_readable(data, pos + 1)
    if resumes is not None:
        raise ValueError(f"{path}: {problem} at byte {pos}, and readable records again from byte {resumes}: "
                         f"the file is damaged in the middle, not torn at its end as a killed writer leaves it")
    log.warning("%s: unreadable tail from byte %d to its end at byte %d (%s at byte %d), as a writer killed "
                "mid-write leaves it: read the complete records before it and stopped there",
                path, tail, len(data), problem, pos)


def _next_readable(data: bytes, after: int) -> int | None:
    """The first byte at or after ``after`` where a readable record (fragment) starts, if any: each byte of the rest
    of ``after``'s block, then only the starts of the blocks after it (a writer starts every block with a record
    header), so that a long file costs one check per 32 KiB block."""
    block_end = min(len(data), (after // BLOCK + 1) * BLOCK)
    for pos in [*range(after, block_end), *range(block_end, len(data), BLOCK)]:
        if pos + RECORD_HEADER <= len(data) and data[pos + RECORD_HEADER - 1] in (FULL, FIRST, MIDDLE, LAST) and \
                _problem(data, pos, data[pos + RECORD_HEADER - 1] in (MIDDLE, LAST)) is None:
            return pos
    return None


def _item_value(item: Any) -> Any:
    return json.loads(item.value_json) if item.value_json else None


def _item_keys(item: Any) -> list[str]:
    """The key path of a config/history/summary item (a Table's fields arrive as ``[key, field]``)."""
    return list(item.nested_key) or [item.key]


@dataclass
class WandbRun:
    """One wandb run as its local files hold it.

    Attributes:
        id, name, project, group, job_type, tags: the run's identity, as ``wandb.init`` set them.
        config: the run config (nested dicts), after every ``config.update``.
        history: one dict per ``log`` step (``_step`` and the logged keys; media as wandb's JSON references).
        summary: the final summary (explicit ``summary`` updates over the last logged values).
        metrics: ``define_metric`` calls: name (or glob) → its step metric and summary options.
        folder: the run folder (``files/`` holds the media the history references).
    """

    id: str = ""
    name: str = ""
    project: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    folder: Path = Path()
    artifacts: dict[str, dict[str, Path]] = field(default_factory=dict)
    """The run's logged artifacts (a Table is one, with its images): client id → file in it → local file."""

    def table(self, key: str, row: int = -1) -> list[dict[str, Any]]:
        """The rows of the Table logged under ``key`` (the ``row``-th time it was logged, the last by default),
        each a dict column → cell; an image cell is wandb's JSON reference with ``local_path`` added (the PNG).

        wandb logs a Table as a run artifact: the full table (images included) is the artifact's file, staged
        under wandb's data folder (``WANDB_DATA_DIR``, by default ``~/.local/share/wandb``) until ``wandb sync``
        uploads it; ``files/media/table/`` keeps a copy whose image cells read only ``"Image"``.

        Raises:
            KeyError: no Table was logged under ``key``.
            FileNotFoundError: the staged artifact is gone (synced and cleaned up, or another data folder).
        """
        logged = [step[key] for step in self.history if isinstance(step.get(key), dict)
                  and str(step[key].get("_type", "")).startswith("table")]
        if not logged:
            raise KeyError(f"no wandb Table {key!r} in run {self.id} (history keys: "
                           f"{sorted({k for step in self.history for k in step})})")
        client_id, _, name = logged[row]["artifact_path"].removeprefix("wandb-client-artifact://").partition("/")
        files = self.artifacts.get(client_id, {})
        if name not in files:
            raise FileNotFoundError(f"the artifact of Table {key!r} (run {self.id}) is not staged on this machine")
        table = json.loads(files[name].read_text())
        rows = [dict(zip(table["columns"], cells)) for cells in table["data"]]
        for row_cells in rows:
            for cell in row_cells.values():
                if isinstance(cell, dict) and cell.get("path") in files:
                    cell["local_path"] = files[cell["path"]]
        return rows

    def series(self, key: str, x: str = "_step") -> list[tuple[Any, Any]]:
        """``(x, key)`` for every history step holding both, in order."""
        return [(step[x], step[key]) for step in self.history if key in step and x in step]


def _set_nested(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def _update(tree: dict[str, Any], record: Any) -> None:
    """Apply a config or summary record (its ``update`` and ``remove`` items) to ``tree``."""
    for item in record.update:
        _set_nested(tree, _item_keys(item), _item_value(item))
    for item in record.remove:
        tree.pop(_item_keys(item)[0], None)


def read_run(folder: str | Path) -> WandbRun:
    """Read the run in ``folder`` (``wandb/run-*`` or ``wandb/offline-run-*``, holding ``run-<id>.wandb``).

    Raises:
        FileNotFoundError: the folder holds no ``run-*.wandb`` log.
    """
    folder = Path(folder)
    logs = sorted(folder.glob("run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"{folder} holds no run-*.wandb file: not a wandb run folder")
    run = WandbRun(folder=folder)
    last: dict[str, Any] = {}
    for record in records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.id, run.name, run.project = r.run_id, r.display_name, r.project
            run.group, run.job_type, run.tags = r.run_group, r.job_type, list(r.tags)
            for item in r.config.update:
                _set_nested(run.config, _item_keys(item), _item_value(item))
        elif kind == "config":
            _update(run.config, record.config)
        elif kind == "history":
            step: dict[str, Any] = {}
            for item in record.history.item:
                _set_nested(step, _item_keys(item), _item_value(item))
            run.history.append(step)
            last.update(step)
        elif kind == "summary":
            _update(run.summary, record.summary)
        elif kind == "artifact":
            run.artifacts[record.artifact.client_id] = {
                entry.path: Path(entry.local_path) for entry in record.artifact.manifest.contents}
        elif kind == "metric":
            m = record.metric
            run.metrics[(m.name or m.glob_name).replace("\\.", ".")] = {  # a dot in a name is escaped
                "step_metric": m.step_metric, "hidden": m.options.hidden,
                "summary": [s for s in ("min", "max", "mean", "last", "best", "first")
                            if getattr(m.summary, s, False)]}
    # wandb keeps config values as {"value": v, "desc": ...}: unwrap what it wrapped
    run.config = {k: v["value"] if isinstance(v, dict) and set(v) <= {"value", "desc"} and "value" in v else v
                  for k, v in run.config.items()}
    run.summary = {**{k: v for k, v in last.items() if not k.startswith("_")}, **run.summary}
    return run


def find_runs(root: str | Path) -> list[WandbRun]:
    """Every wandb run under ``root`` (searched recursively), in the order they started. The sessions of one run
    (a resumed run writes a new ``run-<time>-<id>`` folder per session) are merged into one :class:`WandbRun`:
    their history in order, the later sessions' config, summary and metric definitions over the earlier ones'."""
    folders = sorted({p.parent for p in Path(root).rglob("run-*.wandb")},
                     key=lambda p: p.name.split("run-", 1)[-1])  # <time>-<id>, online and offline alike
    runs: dict[str, WandbRun] = {}
    for folder in folders:
        session = read_run(folder)
        run = runs.setdefault(session.id, session)
        if run is not session:
            run.history += session.history
            run.config.update(session.config)
            run.summary.update(session.summary)
            run.metrics.update(session.metrics)
            run.artifacts.update(session.artifacts)
            run.name, run.folder = session.name or run.name, session.folder
    return list(runs.values())
