"""Partition-independent checkpoints whose cost is the bytes they hold.

``RUN/checkpoints/step-XXXXXXXX/`` holds a shard per parameter owner (``shard-R.pt``: per block
class a few large tensors, values and optimiser moments, with the canonical indices of the
blocks it holds) and ``meta.json``, written last. Loading maps canonical indices to the blocks
the loading rank holds, so a run saved on any layout resumes on any other, dense or sharded.
Every file goes through a temp file + rename and honours the umask; loading uses
``torch.load(weights_only=True, mmap=True)``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

FORMAT = "dhdnn-checkpoint"
VERSION = 2
KEEP = 2  # complete checkpoints kept on disk


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, unreadable or does not fit the model."""


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


UMASK = _umask()


def atomic_write(path: Path, write: Callable, sync: bool = True) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; a run's files follow the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def read_log(path: Path) -> list[dict]:
    """The records of a JSON-lines log of a run. A torn last line (the run killed, or out of disk,
    mid-append) is left out; the next resume rewrites the log without it."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines, 1):
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if i < len(lines):
                raise ValueError(f"{path}: line {i} is not a JSON record ({e.msg}); expected one per line") from None
    return out


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def save_shard(run_dir: Path, step: int, rank: int, entries: dict[str, dict]) -> int:
    """Write one rank's entries (``{key: {ids, axis, values, moments}}``); returns the file size."""
    payload = {"format": FORMAT, "version": VERSION, "rank": rank, "entries": entries}
    path = step_dir(run_dir, step) / f"shard-{rank}.pt"
    atomic_write(path, lambda f: torch.save(payload, f))
    return path.stat().st_size


def finalize(run_dir: Path, step: int, meta: dict) -> None:
    """Mark checkpoint ``step`` complete (after every shard is written) and prune old ones."""
    d = step_dir(run_dir, step)
    sizes = {p.name: p.stat().st_size for p in sorted(d.glob("shard-*.pt"))}
    atomic_write_text(d / "meta.json", json.dumps({"format": FORMAT, "version": VERSION, "step": step,
                                                   "shard_sizes": sizes, **meta}, indent=1))
    atomic_write_text(Path(run_dir) / "checkpoints" / "latest", d.name + "\n")
    for old in complete(run_dir)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)


def complete(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, newest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted((p for p in root.glob("step-*") if (p / "meta.json").exists()), reverse=True)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    found = complete(run_dir)
    return found[0] if found else None


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove what an interrupted writer left behind (temp files, checkpoints without
    ``meta.json``); only the holder of the run's lock may call this. Returns what was removed."""
    removed = []
    root = Path(run_dir)
    for tmp in list(root.glob(".*.tmp")) + list(root.glob("checkpoints/.*.tmp")) + \
            list(root.glob("checkpoints/step-*/.*.tmp")):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    for d in (root / "checkpoints").glob("step-*"):
        if d.is_dir() and not (d / "meta.json").exists():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def read_meta(ckpt_dir: Path) -> dict:
    meta_path = Path(ckpt_dir) / "meta.json"
    if not meta_path.exists():
        raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        old = " (format 1, one tensor per named block, is read by dhdnn before 0.3 only)" if \
            meta.get("version") == 1 else ""
        raise CheckpointError(f"{meta_path}: expected format {FORMAT} v{VERSION}, got "
                              f"{meta.get('format')} v{meta.get('version')}{old}")
    return meta


def load(ckpt_dir: Path) -> tuple[dict[str, Any], list[dict]]:
    """Read a complete checkpoint: ``(meta, shard payloads)``. Tensors are memory-mapped, so a
    rank reads only the pages of the blocks it takes. Every shard is checked (size against the
    meta, then a full read of its index), so a torn checkpoint is reported here."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    shards = sorted(ckpt_dir.glob("shard-*.pt"))
    if not shards or len(shards) != meta.get("shards", len(shards)):
        raise CheckpointError(f"{ckpt_dir}: expected {meta.get('shards')} shard files, found {len(shards)}")
    sizes = meta.get("shard_sizes", {})
    payloads = []
    for s in shards:
        if s.name in sizes and s.stat().st_size != sizes[s.name]:
            raise CheckpointError(f"{s}: {s.stat().st_size} bytes, the checkpoint recorded {sizes[s.name]} "
                                  "(truncated or overwritten)")
        try:
            payload = torch.load(s, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # truncated or foreign file
            raise CheckpointError(f"{s}: cannot be read as a dhdnn checkpoint shard ({why_unreadable(s, e)})") \
                from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{s}: not a dhdnn checkpoint shard")
        payloads.append(payload)
    return meta, payloads


def why_unreadable(path: Path, e: Exception) -> str:
    """torch.load's failure in a line, without its advice to load unsafely."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return "not a file torch.save wrote: truncated, or another format"
    if "Weights only load failed" in str(e):
        return "it holds objects other than tensors and plain data; refused, as loading them could run code"
    return str(e).splitlines()[0]


def load_newest_readable(run_dir: Path, report: Callable[[str], None] = print) -> tuple[Path, dict, list[dict]] | None:
    """The newest complete checkpoint that reads back; unreadable newer ones are reported
    (file named) and skipped. None if the run has no complete checkpoint at all."""
    found = complete(run_dir)
    errors = []
    for d in found:
        try:
            meta, shards = load(d)
        except CheckpointError as e:
            errors.append(str(e))
            report(f"dhdnn: skipping unreadable checkpoint: {e}")
            continue
        if errors:
            report(f"dhdnn: resuming from the previous complete checkpoint {d}")
        return d, meta, shards
    if errors:
        raise CheckpointError(f"{run_dir}: no readable complete checkpoint ({'; '.join(errors)})")
    return None


# ---- the protocol: every rank saves, one completes; the newest readable one resumes --------------
def moments_of(optimizer) -> tuple[str, ...]:
    """The optimiser state tensors shaped like their parameter (Adam's ``exp_avg``, ``exp_avg_sq``;
    SGD's ``momentum_buffer``; ...)."""
    if optimizer is None:
        return ()
    names = set()
    for p, st in optimizer.state.items():
        names |= {k for k, v in st.items() if isinstance(v, Tensor) and v.shape == p.shape}
    return tuple(sorted(names))


def save_all(run_dir: Path, step: int, entries, optimizer, shard: int | None, is_main: bool, barrier: Callable,
             meta: dict, moments: tuple[str, ...] | None = None) -> Path:
    """Checkpoint ``step`` of a run on any number of ranks (collective: every rank calls it).
    ``shard``: the shard this rank writes (None: none, a replica of another); ``is_main`` then
    completes the checkpoint with ``meta`` once every shard is on disk."""
    state_of = (lambda p: optimizer.state[p]) if optimizer is not None else (lambda p: {})
    if shard is not None:
        save_shard(run_dir, step, shard, pack(entries, state_of, moments_of(optimizer) if moments is None else moments))
    barrier()  # every shard is on disk before the checkpoint is marked complete
    if is_main:
        finalize(run_dir, step, {"optimizer_step": _optimizer_step(optimizer), **meta})
    barrier()
    return step_dir(run_dir, step)


def resume(run_dir: Path, entries, optimizer, check: Callable[[Path, dict], None], report=lambda m: None,
           moments: tuple[str, ...] | None = None) -> dict:
    """Restore the newest readable checkpoint of ``run_dir`` (saved on any layout) into this rank's
    ``entries`` and ``optimizer``'s moments (Adam's step count too); ``check(dir, meta)`` refuses
    a checkpoint that does not fit. Returns its metadata."""
    found = load_newest_readable(Path(run_dir), report)
    if found is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint to resume from")
    d, meta, shards = found
    check(d, meta)
    if moments is None:
        moments = tuple(sorted({k for s in shards for e in s["entries"].values() for k in e["moments"]}))
    state_of = (lambda p: optimizer.state[p]) if optimizer is not None else (lambda p: {})
    restore(d, shards, entries, state_of, moments if optimizer is not None else ())
    if optimizer is not None:
        step = float(meta.get("optimizer_step") or meta["step"])
        # where Adam keeps its step count: on the parameter's device for the fused and capturable kernels
        on_device = {id(p): g.get("fused") or g.get("capturable") for g in optimizer.param_groups for p in g["params"]}
        for e in entries:
            for p in e.params:
                if "exp_avg" in optimizer.state[p]:
                    optimizer.state[p]["step"] = torch.tensor(step, device=p.device if on_device[id(p)] else "cpu")
    return meta


def _optimizer_step(optimizer) -> int | None:
    for st in (optimizer.state.values() if optimizer is not None else ()):
        if st.get("step") is not None:
            return int(st["step"])
    return None


# ---- entries <-> shard payloads -------------------------------------------------------------
def pack(entries, state_of: Callable[[Tensor], dict], moments: tuple[str, ...]) -> dict[str, dict]:
    """One rank's entries as a shard payload: values and optimiser moments, block-indexed."""
    out = {}
    for e in entries:
        with torch.no_grad():
            values = e.get([p.detach() for p in e.params]).detach().cpu().contiguous()
            states = [state_of(p) for p in e.params]
            mom = {k: e.get([s[k] for s in states]).detach().cpu().contiguous()
                   for k in moments if all(k in s for s in states)}
        out[e.key] = {"ids": None if e.ids is None else e.ids.cpu(), "axis": e.block_axis, "values": values,
                      "moments": mom}
    return out


def restore(ckpt_dir: Path, shards: list[dict], entries, state_of: Callable[[Tensor], dict],
            moments: tuple[str, ...]) -> None:
    """Write the checkpoint's values (and optimiser moments) into this rank's entries."""
    by_key: dict[str, list[dict]] = {}
    for s in shards:
        for k, v in s["entries"].items():
            by_key.setdefault(k, []).append(v)
    for e in entries:
        parts = by_key.get(e.key)
        if not parts:
            raise CheckpointError(f"{ckpt_dir}: no entry {e.key!r}; the checkpoint does not fit this model")
        like = e.get([p.detach() for p in e.params])
        with torch.no_grad():
            e.put(list(e.params), _collect(ckpt_dir, e, parts, "values", like).to(like.dtype))
            states = [state_of(p) for p in e.params]
            if all(k in part["moments"] for part in parts for k in moments):  # all of them, or a fresh optimiser
                for k in moments:
                    for s, p in zip(states, e.params):
                        s.setdefault(k, torch.zeros_like(p))
                    e.put([s[k] for s in states], _collect(ckpt_dir, e, parts, k, like).to(like.dtype))


def _collect(ckpt_dir: Path, e, parts: list[dict], what: str, like: Tensor) -> Tensor:
    """The values of ``e``'s blocks (``ids``) gathered from every shard that holds some."""
    pick = (lambda part: part["values"]) if what == "values" else (lambda part: part["moments"][what])
    if e.ids is None:
        t = pick(parts[0])
        if tuple(t.shape) != tuple(like.shape):
            raise CheckpointError(f"{ckpt_dir}: {e.key!r} has shape {tuple(t.shape)}, model expects "
                                  f"{tuple(like.shape)}")
        return t
    ids = e.ids.cpu().numpy()
    total = 1 + max([int(ids.max()) if len(ids) else -1] + [int(p["ids"].max()) for p in parts if len(p["ids"])])
    where = np.full(total, -1, np.int64)
    where[ids] = np.arange(len(ids))
    axis = e.block_axis

    def blocks(part: dict) -> Tensor:
        vals = pick(part)
        if vals.shape[:axis] + vals.shape[axis + 1:] != like.shape[:axis] + like.shape[axis + 1:]:
            raise CheckpointError(f"{ckpt_dir}: {e.key!r} blocks have shape {tuple(vals.shape)}, model expects "
                                  f"{tuple(like.shape)} along axis {axis}")
        return vals

    hits = [(part, where[part["ids"].numpy()]) for part in parts]
    hits = [(part, dst) for part, dst in hits if (dst >= 0).any()]
    if len(hits) == 1 and len(hits[0][1]) == len(ids) and (hits[0][1] >= 0).all():
        # one shard holds exactly this rank's blocks (resuming on the same layout): one gather
        order = np.empty(len(ids), np.int64)
        order[hits[0][1]] = np.arange(len(ids))
        return blocks(hits[0][0]).index_select(axis, torch.from_numpy(order)).to(like.dtype)
    out = torch.empty(like.shape, dtype=like.dtype)  # on the CPU, as the shards: ``put`` moves it to the device
    filled = 0
    for part, dst in hits:
        keep = dst >= 0
        src = torch.from_numpy(np.flatnonzero(keep))
        out.index_copy_(axis, torch.from_numpy(dst[keep]), blocks(part).index_select(axis, src).to(out.dtype))
        filled += int(keep.sum())
    if filled != len(ids):
        raise CheckpointError(f"{ckpt_dir}: {e.key!r}: {len(ids) - filled} of this rank's blocks are missing")
    return out


def assemble(shards: list[dict]) -> dict[str, Tensor]:
    """Every entry's values over all shards: block classes in canonical order (all blocks),
    plain tensors as they are. For inspection and tests; training restores with :func:`restore`."""
    parts: dict[str, list[dict]] = {}
    for s in shards:
        for k, v in s["entries"].items():
            parts.setdefault(k, []).append(v)
    out = {}
    for k, ps in parts.items():
        if ps[0]["ids"] is None:
            out[k] = ps[0]["values"]
            continue
        axis = ps[0]["axis"]
        ids = torch.cat([p["ids"] for p in ps])
        vals = torch.cat([p["values"] for p in ps], axis)
        out[k] = vals.index_select(axis, torch.argsort(ids))
    return out
