"""Pictures of a run, each one answering one question: did training converge (``curves.png``), do
gradients vanish across depth (``grad_norms.png``), what did the classifier learn
(``decision_boundary.png``; images: ``confusion.png``, ``misclassified.png``; regression:
``predictions.png``, ``vector_field.png``), and where do the agents live (``topology.png``,
``partition.png``). matplotlib's file-only Agg backend.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .checkpoint import read_log  # noqa: E402


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def _predict(model, x) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(x[i:i + 4096]).argmax(1) for i in range(0, len(x), 4096)]).numpy()


def curves(metrics_path: Path, out: Path) -> Path:
    rows = read_log(metrics_path)
    epochs = [r["epoch"] for r in rows]
    regress = "test_mse" in rows[-1]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    a1.plot(epochs, [r.get("train_loss", r["loss"]) for r in rows], label="train (end of epoch)")
    a1.plot(epochs, [r["loss"] for r in rows], ":", label="train (running, during the epoch)")
    a1.plot(epochs, [r["test_loss"] for r in rows], label="test")
    a1.set(xlabel="epoch", ylabel="mean squared error" if regress else "cross-entropy", title="loss", yscale="log")
    if regress:
        a2.plot(epochs, [r["train_mse"] for r in rows], label="train")
        a2.plot(epochs, [r["test_mse"] for r in rows], label="test")
        a2.set(xlabel="epoch", ylabel="mean squared error", yscale="log",
               title=f"mean squared error (last: test {rows[-1]['test_mse']:.4g})")
    else:
        a2.plot(epochs, [r["train_acc"] for r in rows], label="train")
        a2.plot(epochs, [r["test_acc"] for r in rows], label="test")
        a2.set(xlabel="epoch", ylabel="accuracy", title=f"accuracy (last: test {rows[-1]['test_acc']:.4f})",
               ylim=(max(0.0, min(r["test_acc"] for r in rows) - 0.05), 1.005))
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    return _save(fig, out)


def grad_norm_heatmap(run_dir: Path, out: Path) -> Path:
    """``log10 ||dloss/dy_j||``: rows are layers (input at the bottom), columns recorded iterations.
    Exact zeros (nothing to differentiate yet) are left blank and kept out of the colour range."""
    path = Path(run_dir) / "grad_norms.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no gradient norms recorded; train with train.grad_norm_every > 0")
    rows = read_log(path)
    steps = [r["step"] for r in rows]
    logn, (lo, hi) = heatmap_values(np.array([r["norms"] for r in rows], dtype=float).T)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = ax.imshow(logn, aspect="auto", origin="lower", cmap=cmap, vmin=lo, vmax=hi,
                   extent=(steps[0], steps[-1] + 1, -0.5, logn.shape[0] - 0.5), interpolation="nearest")
    fig.colorbar(im, ax=ax, label="log10 ||dloss/dy_j||  (blank: exactly 0)")
    ax.set(xlabel="training iteration", ylabel="layer j (0 = input state, top = output)",
           title="gradient norms across depth")
    return _save(fig, out)


def heatmap_values(norms: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """``log10`` of the norms with exact zeros masked (NaN), and a colour range spanning the
    positive values only."""
    positive = norms[norms > 0]
    logn = np.where(norms > 0, np.log10(np.where(norms > 0, norms, 1.0)), np.nan)
    lo, hi = (float(np.log10(positive.min())), float(np.log10(positive.max()))) if positive.size else (0.0, 1.0)
    return logn, (lo, hi if hi > lo else lo + 1.0)


GRID_FLOPS = 2e11  # the decision boundary's grid through the dense model costs at most this (seconds)


def grid_resolution(model, most: int = 200, least: int = 20) -> int:
    """Points per side of the decision boundary's grid: ``most``, or fewer where one sample through
    the (dense) model costs so much that the full grid would take minutes (a large graph's run)."""
    per_sample = 2 * sum(p.numel() for p in model.parameters())
    return int(max(least, min(most, (GRID_FLOPS / max(per_sample, 1)) ** 0.5)))


def decision_boundary(model, data, out: Path, resolution: int | None = None) -> Path:
    """Colour the plane by predicted class and overlay the test points."""
    if data.n_features != 2:
        raise ValueError(f"decision boundary: needs 2-D data, {data.name} has {data.n_features} features")
    resolution = resolution or grid_resolution(model)
    x0, x1, y0, y1 = data.domain or (-2, 2, -2, 2)
    gx, gy = np.meshgrid(np.linspace(x0, x1, resolution), np.linspace(y0, y1, resolution))
    grid = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=data.x_test.dtype)
    pred = _predict(model, grid).reshape(gx.shape)
    acc = float((_predict(model, data.x_test) == data.y_test.numpy()).mean())
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.contourf(gx, gy, pred, levels=[-0.5, 0.5, 1.5], colors=["#9ecae1", "#fdae6b"], alpha=0.6)
    xt, yt = data.x_test.numpy(), data.y_test.numpy()
    for c, colour in ((0, "#3182bd"), (1, "#e6550d")):
        ax.scatter(xt[yt == c, 0], xt[yt == c, 1], c=colour, s=2, label=f"class {c}")
    ax.set(xlim=(x0, x1), ylim=(y0, y1), title=f"{data.name}, test split: accuracy {acc:.4f}")
    ax.legend(loc="upper right", fontsize=8, markerscale=4)
    return _save(fig, out)


def _names(data) -> list[str]:
    return list(data.class_names) if data.class_names else [str(c) for c in range(data.n_classes)]


def confusion(pred: np.ndarray, data, out: Path) -> Path:
    """``pred``: the predicted class of every test image."""
    true = data.y_test.numpy()
    k = data.n_classes
    m = np.zeros((k, k), dtype=int)
    np.add.at(m, (true, pred), 1)
    named = data.class_names is not None
    fig, ax = plt.subplots(figsize=(7, 6.2) if named else (5.5, 5))
    im = ax.imshow(m, cmap="Blues")
    for i in range(k):
        for j in range(k):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted class", ylabel="true class",
           title=f"{data.name}, test split: accuracy {np.trace(m) / m.sum():.4f}")
    if named:
        ax.set_xticklabels(_names(data), rotation=45, ha="right", fontsize=8)
        ax.set_yticklabels(_names(data), fontsize=8)
    fig.colorbar(im, ax=ax, label="test images")
    return _save(fig, out)


def misclassified(pred: np.ndarray, data, out: Path, most: int = 25) -> Path:
    """``pred``: the predicted class of every test image."""
    true = data.y_test.numpy()
    wrong = np.flatnonzero(pred != true)[:most]
    c, H, W = data.image_shape
    cols = 5
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 2.0 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    names = _names(data)
    for ax, i in zip(axes.ravel(), wrong):
        ax.imshow(data.x_test[i].view(c, H, W)[0].float().numpy(), cmap="gray_r")
        ax.set_title(f"true {names[true[i]]}\npred {names[pred[i]]}", fontsize=7, color="#b2182b")
    fig.suptitle(f"{len(np.flatnonzero(pred != true))} misclassified test images (first {len(wrong)})"
                 if len(wrong) else "no misclassified test image", fontsize=10)
    return _save(fig, out)


def _outputs(model, x) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(x[i:i + 4096]) for i in range(0, len(x), 4096)]).double().numpy()


def predictions(model, data, out: Path, most: int = 4) -> Path:
    """Regression: predicted against true value of every test sample, one panel per output."""
    pred, true = _outputs(model, data.x_test), data.y_test.double().numpy()
    k = min(most, true.shape[1])
    fig, axes = plt.subplots(1, k, figsize=(3.6 * k, 3.6), squeeze=False)
    for j, ax in enumerate(axes[0]):
        lo, hi = float(min(true[:, j].min(), pred[:, j].min())), float(max(true[:, j].max(), pred[:, j].max()))
        ax.plot([lo, hi], [lo, hi], color="#888888", lw=1, label="prediction = target")
        ax.scatter(true[:, j], pred[:, j], s=3, alpha=0.5)
        mse = float(np.mean((pred[:, j] - true[:, j]) ** 2))
        ax.set(xlabel=f"target {j}", ylabel=f"prediction {j}", title=f"output {j}: test mse {mse:.3g}")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{data.name}, test split", fontsize=10)
    return _save(fig, out)


def vector_field(model, data, out: Path, most: int = 400) -> Path:
    """Regression from 2 inputs to 2 outputs: the true and the learned field at test points."""
    x = data.x_test[:most]
    pred, true, xs = _outputs(model, x), data.y_test[:most].double().numpy(), x.double().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
    scale = float(np.abs(true).max()) * 25 or 1.0
    for ax, v, title in ((axes[0], true, "target field"), (axes[1], pred, "learned field")):
        ax.quiver(xs[:, 0], xs[:, 1], v[:, 0], v[:, 1], np.hypot(v[:, 0], v[:, 1]), angles="xy",
                  scale_units="xy", scale=scale / (np.ptp(xs[:, 0]) or 1.0), cmap="viridis", width=0.003)
        ax.set(xlabel="input 0", ylabel="input 1", title=title)
    mse = float(np.mean((pred - true) ** 2))
    fig.suptitle(f"{data.name}, {len(xs)} test points: mse {mse:.3g}", fontsize=10)
    return _save(fig, out)


def plot_run(run: Path, say=print) -> list[Path]:
    """Every picture a run directory supports; returns the files written. ``say``: where a note on
    a picture left out goes (the model's pictures where its dense form does not fit in memory)."""
    from .export import dense_model_of_run
    from .resources import TooLarge, human
    from .rundir import run_config
    from .topology import load_topology
    from .train import load_data

    run = Path(run)
    written = []
    if not (run / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run}: no metrics.jsonl; is this a dhdnn run directory that trained an epoch?")
    written.append(curves(run / "metrics.jsonl", run / "curves.png"))
    if (run / "grad_norms.jsonl").exists():
        written.append(grad_norm_heatmap(run, run / "grad_norms.png"))
    try:
        cfg, model, topo = dense_model_of_run(run)
    except TooLarge as e:
        say(f"dhdnn plot: {run}: no pictures of the model's predictions: its dense form needs an estimated "
            f"{human(e.need)}, more than this machine's {human(e.avail)} available")
        cfg, model = run_config(run), None
        topo = load_topology(cfg.topology) if cfg.topology is not None else None
    if model is not None:
        written += _model_pictures(run, model, load_data(cfg))
    if topo is not None:
        written.append(topology_plot(topo, None, run / "topology.png"))
        partitions = _partitions(run, cfg, topo)
        if partitions > 1:
            from .partitioner import partition

            written.append(topology_plot(topo, partition(topo, partitions), run / "partition.png"))
    return written


def _model_pictures(run: Path, model, data) -> list[Path]:
    written = []
    if data.task == "regress":
        written.append(predictions(model, data, run / "predictions.png"))
        if data.n_features == 2 and data.n_outputs == 2:
            written.append(vector_field(model, data, run / "vector_field.png"))
    elif data.n_features == 2:
        written.append(decision_boundary(model, data, run / "decision_boundary.png"))
    if data.image_shape is not None and data.task == "classify":
        pred = _predict(model, data.x_test)  # once, for both pictures
        written.append(confusion(pred, data, run / "confusion.png"))
        written.append(misclassified(pred, data, run / "misclassified.png"))
    return written


def _partitions(run: Path, cfg, topo) -> int:
    """The run's agent partitions: as recorded (``run.replicas: auto`` chooses at start-up), else
    the layout its config asks for (1 for a run in one process)."""
    from .distributed.mesh import check_layout

    summary = run / "summary.json"
    layout = json.loads(summary.read_text()).get("layout") if summary.exists() else None
    if layout:
        return int(layout["agents"])
    sharded = cfg.run.workers > 1 and cfg.run.engine != "dense"
    return check_layout(cfg.run.workers, cfg.run.replicas, topo, cfg.train.batch_size).agents if sharded else 1


def topology_plot(topo, part, out) -> Path:
    """The agent graph. Node size follows the agent's dimension ``n_i`` (the label says it);
    agents fed by input features are squares, readout agents have a black outline. With a
    partition: colours by worker (legend: agents and load of each), cut edges dashed red."""
    import networkx as nx
    from matplotlib.lines import Line2D

    g = topo.graph
    pos = nx.kamada_kawai_layout(g) if topo.n_agents <= 64 else nx.spring_layout(g, seed=0)
    fig, ax = plt.subplots(figsize=(7, 6.5))
    cut = {tuple(e) for e in part.cut_edges(topo).tolist()} if part is not None else set()
    nx.draw_networkx_edges(g, pos, edgelist=[e for e in g.edges if tuple(sorted(e)) not in cut], ax=ax, width=0.8,
                           edge_color="#888888")
    if cut:
        nx.draw_networkx_edges(g, pos, edgelist=sorted(cut), ax=ax, style="dashed", edge_color="#d62728", width=1.4)
    fed = {f.agent for f in topo.inputs} | {e.agent for e in topo.embeddings}
    if not topo.inputs and not topo.embeddings:
        fed = set(range(min(2, topo.n_agents)))  # default placement: feature f enters agent f
    readout = set(topo.readout.tolist())
    dims = topo.dims
    size = lambda i: 120 + 60 * int(dims[i]) if topo.n_agents <= 64 else 12 + 4 * int(dims[i])  # noqa: E731
    cmap = plt.get_cmap("tab10" if part is None or part.workers <= 10 else "tab20")
    colour = lambda i: cmap(int(part.assignment[i]) % cmap.N) if part is not None else "#6baed6"  # noqa: E731
    for shape, members in (("s", [i for i in g.nodes if i in fed]), ("o", [i for i in g.nodes if i not in fed])):
        if members:
            nx.draw_networkx_nodes(g, pos, nodelist=members, node_shape=shape, ax=ax,
                                   node_size=[size(i) for i in members], node_color=[colour(i) for i in members],
                                   edgecolors=["black" if i in readout else "none" for i in members], linewidths=1.5)
    if topo.n_agents <= 32:  # beside the node, not on it: "id, n=dim"
        span = np.ptp(np.array(list(pos.values())), axis=0).max() or 1.0
        shifted = {i: (x, y + 0.045 * span) for i, (x, y) in pos.items()}
        nx.draw_networkx_labels(g, shifted, {i: f"{a}, n={dims[i]}" for i, a in enumerate(topo.ids)}, font_size=8,
                                ax=ax, verticalalignment="bottom")
    handles = [Line2D([], [], marker="s", ls="", color="#999999", label="input agent"),
               Line2D([], [], marker="o", ls="", color="#999999", markeredgecolor="black", label="readout agent"),
               Line2D([], [], marker="o", ls="", color="#999999", markersize=4, label="size: agent dim n_i")]
    title = f"{topo.name}: {topo.n_agents} agents, {len(topo.edges)} edges"
    if part is not None:
        loads = part.loads(topo)
        counts = np.bincount(part.assignment, minlength=part.workers)
        handles += [Line2D([], [], marker="o", ls="", color=cmap(r % cmap.N),
                           label=f"worker {r}: {counts[r]} agents, load {loads[r]}") for r in range(part.workers)]
        handles.append(Line2D([], [], ls="--", color="#d62728", label=f"cut edges: {len(cut)}"))
        title += f"\n{part.workers} workers, {len(cut)} cut edges, halo volume {part.objective(topo)[0]}"
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return _save(fig, out)
