"""Partition-independent checkpoints, written atomically.

A checkpoint is a directory ``RUN/checkpoints/step-XXXXXXXX/`` holding one shard per rank
(``shard-R.pt``: parameter blocks and their Adam moments keyed by *canonical* names, e.g.
``agent3.K_p.5`` for a topology run or ``body.K`` for a dense one) and ``meta.json``
(epoch, step, config), written last. ``RUN/checkpoints/latest`` names the newest complete
one. Because blocks are keyed by name rather than by rank, a run saved on 4 workers loads
on 2. Every file goes through a temp file + rename, so a crash never leaves a torn file,
and loading uses ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "dhdnn-checkpoint"
VERSION = 1
KEEP = 2  # complete checkpoints kept on disk


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


def atomic_write(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def save_shard(run_dir: Path, step: int, rank: int, blocks: dict[str, torch.Tensor],
               optim: dict[str, dict[str, torch.Tensor]], extra: dict | None = None) -> None:
    payload = {"format": FORMAT, "version": VERSION, "blocks": {k: v.detach().cpu().clone() for k, v in blocks.items()},
               "optim": {k: {s: t.detach().cpu().clone() for s, t in v.items()} for k, v in optim.items()},
               "extra": extra or {}}
    atomic_write(step_dir(run_dir, step) / f"shard-{rank}.pt", lambda f: torch.save(payload, f))


def finalize(run_dir: Path, step: int, meta: dict) -> None:
    """Mark checkpoint ``step`` complete (after every shard is written) and prune old ones."""
    d = step_dir(run_dir, step)
    atomic_write_text(d / "meta.json", json.dumps({"format": FORMAT, "version": VERSION, "step": step, **meta},
                                                  indent=1))
    atomic_write_text(Path(run_dir) / "checkpoints" / "latest", d.name + "\n")
    complete = sorted(p for p in d.parent.glob("step-*") if (p / "meta.json").exists())
    for old in complete[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.exists():
        d = root / pointer.read_text().strip()
        if (d / "meta.json").exists():
            return d
    complete = sorted(p for p in root.glob("step-*") if (p / "meta.json").exists())
    return complete[-1] if complete else None


def load(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Read a complete checkpoint: (meta, blocks, optimizer moments), merged over all shards."""
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / "meta.json"
    if not meta_path.exists():
        raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path}: expected format {FORMAT} v{VERSION}, got "
                              f"{meta.get('format')} v{meta.get('version')}")
    shards = sorted(ckpt_dir.glob("shard-*.pt"))
    if len(shards) != meta.get("shards", len(shards)) or not shards:
        raise CheckpointError(f"{ckpt_dir}: expected {meta.get('shards')} shard files, found {len(shards)}")
    blocks, optim = {}, {}
    for s in shards:
        try:
            payload = torch.load(s, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign file
            raise CheckpointError(f"{s}: cannot be read as a dhdnn checkpoint shard ({e})") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{s}: not a dhdnn checkpoint shard")
        blocks.update(payload["blocks"])
        optim.update(payload["optim"])
    return meta, blocks, optim
