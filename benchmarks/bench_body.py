"""The main job's H-DNN body alone (ring8's dense masked H2: dim 16, 4 layers, batch 125; one
thread): median seconds of its forward and of its backward over 2,500 passes, in whichever dhdnn
checkout is on the path (``bench_vs_landed.py``'s ``body`` case runs it in both). Prints one JSON
line; run from a checkout's root.

    python benchmarks/bench_body.py
"""
from __future__ import annotations

import json
import statistics
import time

import torch

from dhdnn.config import load_config
from dhdnn.run import validate
from dhdnn.train import load_data


def dense_model(cfg, data, topo):
    """The run's dense model, with the run's backprop, in this checkout or in 1824fcf's."""
    try:
        from dhdnn.run import dense_model as build
    except ImportError:  # 1824fcf: built by hand as its train_dense did
        from dhdnn.build import build_classifier
        from dhdnn.train import DTYPES

        model, _ = build_classifier(cfg, data.n_features, data.n_outputs, topo, DTYPES[cfg.run.dtype],
                                    data.image_shape)
        rc = cfg.run
        model.body.set_backprop(rc.backprop, rc.anchors, rc.reversible_state, rc.reversible_fraction_bits)
        return model
    return build(cfg, data, topo, "cpu")[0]


def main(passes: int = 3000, warm: int = 500) -> None:
    torch.set_num_threads(1)
    cfg = load_config("launch/ring8_swiss_roll.yaml")
    data = load_data(cfg)
    model = dense_model(cfg, data, validate(cfg).topo)
    y0 = model.initial_state(data.x_train[:cfg.train.batch_size]).detach()
    fw, bw = [], []
    for _ in range(passes):
        t0 = time.perf_counter()
        out = model.body(y0.requires_grad_())
        t1 = time.perf_counter()
        out.sum().backward()
        fw.append(t1 - t0)
        bw.append(time.perf_counter() - t1)
        y0.grad = None
        model.body.zero_grad(set_to_none=True)
    f, b = statistics.median(fw[warm:]), statistics.median(bw[warm:])
    print(json.dumps({"forward_s": f, "backward_s": b, "seconds": f + b}))


if __name__ == "__main__":
    main()
