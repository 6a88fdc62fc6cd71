"""From a networkx graph to a trained, exported network, in one process.

    python examples/networkx_graph.py --out runs/ws12.pt

Any undirected networkx graph becomes a topology (node attribute ``dim``: the agent's state
entries); ``build_network`` makes the masked H-DNN on it, a plain loop trains it, and
``export_model`` writes one file that ``dhdnn.load_exported`` (or ``dhdnn evaluate``) reads back.
"""
from __future__ import annotations

import argparse

import networkx as nx
import torch
import torch.nn.functional as F

import dhdnn


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/ws12.pt")
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args(argv)

    g = nx.connected_watts_strogatz_graph(12, 4, 0.3, seed=1)  # a small-world graph of 12 agents
    for n in g.nodes:
        g.nodes[n]["dim"] = 1 + n % 2  # agents with 1 or 2 entries of p and of q
    topo = dhdnn.Topology.from_networkx(g, name="ws12", inputs=[{"feature": 0, "agent": 0, "part": "p"},
                                                                 {"feature": 1, "agent": 6, "part": "q"}])
    data = dhdnn.load_dataset("double_circles", n_samples=2000, seed=0)
    x_train, x_test = data.x_train.float(), data.x_test.float()
    torch.manual_seed(0)
    model = dhdnn.build_network(topo, arch="H2", layers=16, h=0.4, n_outputs=2, init_std=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(x_train)).split(100):
            opt.zero_grad()
            loss = F.cross_entropy(model(x_train[idx]), data.y_train[idx]) + model.regularizer(1e-3)
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == data.y_test).float().mean())
    dhdnn.export_model(model, args.out, data={"name": "double_circles", "n_samples": 2000, "seed": 0})  # for evaluate
    back = dhdnn.load_exported(args.out)
    with torch.no_grad():
        same = torch.equal(back(x_test), model(x_test))
    print(f"{topo.name}: {topo.n_agents} agents, {len(topo.edges)} edges; test accuracy {acc:.4f}; "
          f"exported to {args.out} (reloaded: {'identical' if same else 'DIFFERENT'} logits)")


if __name__ == "__main__":
    main()
