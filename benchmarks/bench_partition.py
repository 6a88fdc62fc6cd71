"""Partition quality: edge cut and max/mean load of the default partitioner (METIS + pins/balance
repair), plain METIS and the networkx recursive-bisection fallback, on ring 256, grid 16x16 and
the 256-agent random geometric graph at 2, 4 and 8 workers.

    python benchmarks/bench_partition.py
"""
from __future__ import annotations

import time

from common import write_result
from dhdnn.partition import Partition, metis_parts, partition
from dhdnn.topology import load_topology

FILES = ["topologies/ring256.yaml", "topologies/grid16x16.yaml", "topologies/rgg256.yaml"]


def main():
    rows = []
    print(f"{'topology':10} {'workers':>7} | {'default cut':>11} {'load':>5} | {'METIS cut':>9} {'load':>5} | "
          f"{'fallback cut':>12} {'load':>5} | {'default/METIS':>13} {'fallback/METIS':>14}")
    for f in FILES:
        topo = load_topology(f)
        for w in (2, 4, 8):
            t = time.perf_counter()
            default = partition(topo, w)
            t_default = time.perf_counter() - t
            plain = Partition(tuple(metis_parts(topo, w)), w, "metis-plain")
            t = time.perf_counter()
            fallback = partition(topo, w, "bisection")
            t_fallback = time.perf_counter() - t
            cuts = {k: len(p.cut_edges(topo)) for k, p in (("default", default), ("metis", plain), ("fallback", fallback))}
            loads = {k: p.imbalance(topo) for k, p in (("default", default), ("metis", plain), ("fallback", fallback))}
            row = {"topology": topo.name, "workers": w, "cut": cuts, "max_over_mean_load": loads,
                   "default_over_metis": cuts["default"] / cuts["metis"],
                   "fallback_over_metis": cuts["fallback"] / cuts["metis"],
                   "seconds": {"default": t_default, "fallback": t_fallback}}
            rows.append(row)
            print(f"{topo.name:10} {w:>7} | {cuts['default']:>11} {loads['default']:>5.2f} | {cuts['metis']:>9} "
                  f"{loads['metis']:>5.2f} | {cuts['fallback']:>12} {loads['fallback']:>5.2f} | "
                  f"{row['default_over_metis']:>13.3f} {row['fallback_over_metis']:>14.3f}")
    print(f"wrote {write_result('partition', {'rows': rows})}")


if __name__ == "__main__":
    main()
