"""Figures of a run: the decision boundary over 2-D data and the layer x iteration heatmap
of ``||dloss/dy_j||`` recorded during training. Uses matplotlib's file-only Agg backend."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def decision_boundary(model, data, out: Path, resolution: int = 200) -> Path:
    """Colour the plane by predicted class and overlay the test points."""
    if data.n_features != 2:
        raise ValueError(f"decision boundary: needs 2-D data, {data.name} has {data.n_features} features")
    x0, x1, y0, y1 = data.domain or (-2, 2, -2, 2)
    gx, gy = np.meshgrid(np.linspace(x0, x1, resolution), np.linspace(y0, y1, resolution))
    grid = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=data.x_test.dtype)
    with torch.no_grad():
        pred = model(grid).argmax(1).numpy().reshape(gx.shape)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.contourf(gx, gy, pred, levels=[-0.5, 0.5, 1.5], colors=["#9ecae1", "#fdae6b"], alpha=0.6)
    xt, yt = data.x_test.numpy(), data.y_test.numpy()
    ax.scatter(xt[:, 0], xt[:, 1], c=np.where(yt == 1, "#e6550d", "#3182bd"), s=2)
    ax.set(xlim=(x0, x1), ylim=(y0, y1), title=f"{data.name}: decision boundary")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def grad_norm_heatmap(run_dir: Path, out: Path) -> Path:
    """Heatmap of ``log10 ||dloss/dy_j||`` (rows: layer j, columns: recorded iteration)."""
    path = Path(run_dir) / "grad_norms.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no gradient norms recorded; train with train.grad_norm_every > 0")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    norms = np.array([r["norms"] for r in rows]).T
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    im = ax.imshow(np.log10(np.maximum(norms, 1e-300)), aspect="auto", origin="lower", cmap="viridis",
                   extent=(steps[0], steps[-1] + 1, -0.5, norms.shape[0] - 0.5))
    fig.colorbar(im, ax=ax, label="log10 ||dloss/dy_j||")
    ax.set(xlabel="iteration", ylabel="layer j", title="gradient norms across depth")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_run(run: Path) -> list[Path]:
    """Every picture a run directory supports; returns the files written."""
    from .export import dense_model_of_run
    from .train import load_data

    run = Path(run)
    written = []
    if (run / "grad_norms.jsonl").exists():
        written.append(grad_norm_heatmap(run, run / "grad_norms.png"))
    cfg, model, _ = dense_model_of_run(run)
    data = load_data(cfg)
    if data.n_features == 2:
        written.append(decision_boundary(model, data, run / "decision_boundary.png"))
    if not written:
        raise ValueError(f"{run}: nothing to plot (no gradient norms recorded and the data is not 2-D)")
    return written


def topology_plot(topo, part, out) -> Path:
    """The agent graph; with a partition, agents coloured by worker and cut edges dashed."""
    import networkx as nx

    g = topo.graph
    pos = nx.kamada_kawai_layout(g) if topo.n_agents <= 64 else nx.spring_layout(g, seed=0)
    fig, ax = plt.subplots(figsize=(6, 6))
    colors = [int(part.assignment[i]) for i in g.nodes] if part is not None else "#6baed6"
    cut = {tuple(e) for e in part.cut_edges(topo).tolist()} if part is not None else set()
    nx.draw_networkx_edges(g, pos, edgelist=[e for e in g.edges if tuple(sorted(e)) not in cut], ax=ax, width=0.8)
    if cut:
        nx.draw_networkx_edges(g, pos, edgelist=sorted(cut), ax=ax, style="dashed", edge_color="#d62728", width=1.2)
    cmap = {"cmap": "tab10", "vmin": 0, "vmax": 9} if part is not None else {}
    nx.draw_networkx_nodes(g, pos, node_color=colors, node_size=max(20, 300 - topo.n_agents), ax=ax, **cmap)
    if topo.n_agents <= 32:
        nx.draw_networkx_labels(g, pos, {i: str(a) for i, a in enumerate(topo.ids)}, font_size=8, ax=ax)
    title = topo.name if part is None else f"{topo.name}: {part.workers} workers, {len(cut)} cut edges"
    ax.set_title(title)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
