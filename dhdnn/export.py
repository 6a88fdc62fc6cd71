"""Export a run as one dense, partition-free file (plain tensors and data: it loads with
``torch.load(weights_only=True)``; the schema is in the README), and load it back.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from .models import ARCHITECTURES, NETWORKS, Classifier, build_model

FORMAT, VERSION = "dhdnn-export", 1


def dense_model_of_run(run_dir: str | Path):
    """``(config or None, dense model with the newest weights, topology or None)`` of a run
    directory (``dhdnn train``) or of a checkpoint directory a user's loop saved
    (:meth:`~dhdnn.distributed.DistributedNetwork.save`), from any working directory: both hold
    what defines their network."""
    from .build import NetworkSpec, build_with_table
    from .engine import DenseEngine
    from .resources import estimate, require
    from .rundir import run_config
    from .topology import load_topology, topology_from_dict
    from .train import DTYPES, load_data

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a directory")
    has_config = (run_dir / "config.yaml").exists()
    found = ckpt.load_newest_readable(run_dir, report=lambda m: None)
    if found is None:
        raise ckpt.CheckpointError(f"{run_dir}: no complete checkpoint to export")
    d, meta, shards = found
    cfg = run_config(run_dir) if has_config else None
    if cfg is not None:
        topo = load_topology(cfg.topology) if cfg.topology is not None else None
        dtype = DTYPES[cfg.run.dtype]
    elif "network" in meta:
        spec_topo = meta.get("topology_spec")
        topo = topology_from_dict(spec_topo, str(d / "meta.json")) if spec_topo is not None else None
        dtype = next(e["values"].dtype for s in shards for e in s["entries"].values())
    else:
        raise ckpt.CheckpointError(f"{run_dir}: neither a run directory (config.yaml) nor a checkpoint saved with "
                                   "its network (meta.json key 'network')")
    if "network" in meta:
        spec = NetworkSpec.from_dict(meta["network"])
    else:  # older checkpoints: the data says the network's input and output sizes
        data = load_data(cfg)
        spec = NetworkSpec.from_config(cfg, data.n_features, data.n_outputs, data.image_shape)
    if cfg is not None:  # refused with the estimate, not killed by the kernel while building it (TooLarge)
        est = estimate(cfg, topo, spec.n_features, spec.n_outputs, 0, 1, False)
        require(2 * est.params, f"{cfg.source}: key 'model': the dense model of {run_dir}, built beside its "
                                "checkpoint's blocks, needs an estimated")
    model, table = build_with_table(spec, topo, dtype)
    ckpt.restore(d, shards, DenseEngine(model, table=table).entries(), lambda p: {}, ())
    return cfg, model, topo


def trainable_parameters(model) -> int:
    """Parameters training can change: masked-out entries of the weight matrices do not count."""
    n = 0
    for name, p in model.named_parameters():
        mask = getattr(model.body, f"mask_{name.split('.', 1)[1]}", None) if name.startswith("body.") else None
        n += int(mask.sum()) * (p.shape[0] if mask is not None and mask.dim() < p.dim() else 1) \
            if mask is not None else p.numel()
    return n


def export_model(model, out: str | Path, cfg=None, data: dict | None = None) -> Path:
    """Write ``model`` (a dense network: from a run, :func:`dhdnn.build_network` or a user's
    loop) as one export file; ``cfg``: the run config it came from, if any; ``data``: else the
    data it was trained on, as a run config's ``data`` section (``{"name": "double_moons",
    "n_samples": 2000}``, validated here): ``dhdnn evaluate`` reads it, and asks for data
    where none is recorded."""
    body = model.body
    spec = getattr(model, "spec", None)
    payload = {
        "format": FORMAT, "version": VERSION,
        "arch": body.arch_name, "h": body.h, "layers": body.layers, "dim": body.dim,
        "J": getattr(body, "J_kind", None), "trainable_parameters": trainable_parameters(model),
        "n_features": model.n_features, "n_classes": model.n_classes,
        "task": spec.task if spec is not None else "classify",
        "spec": spec.to_dict() if spec is not None else None,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": cfg.to_dict() if cfg is not None else ({"data": _data_section(data)} if data else {}),
        "topology": None,
    }
    topo = getattr(model, "topology", None)
    payload.update(network=model.kind, **model.export_fields())
    if topo is not None:
        from .topology import topology_to_dict

        payload["topology"] = topology_to_dict(topo)
    out = Path(out)
    ckpt.atomic_write(out, lambda f: torch.save(payload, f))
    return out


def _data_section(data: dict) -> dict:
    from .config import config_from_dict

    return config_from_dict({"data": data}, "export_model(data=...)").to_dict()["data"]


def load_exported(path: str | Path) -> Classifier:
    """The dense single-process network of an export file (``dhdnn export``,
    :func:`export_model`), a run directory, or a checkpoint directory saved by a distributed
    network (:meth:`~dhdnn.distributed.DistributedNetwork.save`): shards of any number of
    workers load as one model, in one process, without ``torch.distributed``."""
    if Path(path).is_dir():
        return dense_model_of_run(path)[1]
    return model_from_export(read_export(path), path)


def read_export(path: str | Path) -> dict:
    """The validated payload of an export file (model, config and topology)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such exported model")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a dhdnn export ({ckpt.why_unreadable(path, e)})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
        raise ValueError(f"{path}: key 'format': expected {FORMAT} v{VERSION}")
    return d


def model_from_export(d: dict, path: str | Path = "<export>") -> Classifier:
    """Rebuild the dense classifier from an export payload (see :func:`read_export`)."""
    sd = d["state_dict"]
    cls = ARCHITECTURES.get(d["arch"])
    if cls is None:
        raise ValueError(f"{path}: key 'arch': unknown architecture {d['arch']!r}")
    masks = {key: sd[f"body.mask_{p}"] for p, key in cls.masked.items() if f"body.mask_{p}" in sd}
    opts = {k: d[k] for k in cls.config_options}
    if "body.X" in sd:
        opts["X"] = sd["body.X"]
    body = build_model(d["arch"], d["dim"], d["layers"], d["h"], mask=masks or None, **opts)
    kind = d.get("network", "state")
    if kind not in NETWORKS:
        raise ValueError(f"{path}: key 'network': unknown network {kind!r}; expected one of {sorted(NETWORKS)}")
    model = NETWORKS[kind].from_export(d, body)
    model = model.to(next(v for v in sd.values() if v.is_floating_point()).dtype)
    model.load_state_dict(sd)
    from .build import NetworkSpec
    from .topology import topology_from_dict

    model.spec = NetworkSpec.from_dict(d["spec"]) if d.get("spec") else None
    model.topology = topology_from_dict(d["topology"], f"{path}: topology") if d.get("topology") else None
    return model
