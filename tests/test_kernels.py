"""The fused (compiled) block kernel against the PyTorch block kernel, its oracle: every product a
rank's integrator asks for, on a rank with a halo, in float64 (1e-12 relative: the two sum the
same terms in another order) and float32 (1e-5). Pure maths, one process."""
import numpy as np
import pytest
import torch

from dhdnn.integrator import class_rows
from dhdnn.integrator.kernels import BlockKernel, FusedKernel, build_kernels


def rank_classes(seed: int, contiguous: bool = True, dims=(3, 4)):
    """A rank of 30 agents (dims 4 and 3: two block classes of 4x4 / 4x3 / 3x4 / 3x3) with 12
    halo agents, random neighbourhoods (every agent's own block included); ``contiguous=False``
    shuffles one class's rows inside its agents (that class takes the gather path)."""
    rng = np.random.default_rng(seed)
    n_own, n_halo = 30, 12
    dims = rng.choice(list(dims), n_own + n_halo)
    start = np.concatenate([[0], np.cumsum(dims)[:-1]])
    F = int(dims[:n_own].sum())
    E = int(dims.sum())
    blocks = {}
    for i in range(n_own):
        for k in {i, *rng.choice(n_own + n_halo, 4, replace=False).tolist()}:
            blocks.setdefault((int(dims[i]), int(dims[k])), []).append((i, k))
    classes = []
    for ci, ((r, c), pairs) in enumerate(sorted(blocks.items())):
        rows = np.array([start[i] + np.arange(r) for i, _ in pairs])
        cols = np.array([start[k] + np.arange(c) for _, k in pairs])
        if not contiguous and ci == 0:
            rows = rows[:, ::-1].copy()
        classes.append(class_rows(rows, cols, F)[0])
    return classes, F, E


def products(kern, Ws, X, s, gu, GZ, bias):
    """Everything the integrator asks of a kernel for layer 1: forward ``K X + b`` (local then halo
    columns), the transposed product split as the exchange needs it, the weight gradient."""
    F, E, B = bias.shape[0], X.shape[0], X.shape[1]
    st = kern.prepare(Ws)
    out, Z = torch.full((F, B), 7.0, dtype=X.dtype), torch.full((E, B), 7.0, dtype=X.dtype)  # stale values
    kern.mv_local(st, 1, X, out, bias)
    kern.mv_halo(st, 1, X, out)
    kern.tmv_halo(st, 1, s, Z)
    kern.tmv_local(st, 1, s, Z)
    nobias = torch.full((F, B), 7.0, dtype=X.dtype)
    kern.mv_local(st, 1, X, nobias)
    G = [torch.full_like(W, 7.0) for W in Ws]
    kern.grad(st, G, 1, gu, X, s, GZ)
    return [out, Z, nobias, *[g[1] for g in G]]


@pytest.mark.parametrize("own_loops", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fused_kernel_equals_the_pytorch_block_kernel(dtype, tol, contiguous, own_loops, monkeypatch):
    """Both kinds of loops, each made to take every class: compiled for each block shape, and
    the one nest for every shape."""
    import dhdnn.integrator.kernels as K

    monkeypatch.setattr(K, "SPECIALISE_SHARE", 0.0 if own_loops else 2.0)
    classes, F, E = rank_classes(0, contiguous)
    g = torch.Generator().manual_seed(1)
    Ws = [torch.randn(3, *c.shape, generator=g, dtype=dtype) for c in classes]
    X, GZ = (torch.randn(E, 37, generator=g, dtype=dtype) for _ in range(2))  # odd batch: loop remainders
    s, gu = (torch.randn(F, 37, generator=g, dtype=dtype) for _ in range(2))
    bias = torch.randn(F, 1, generator=g, dtype=dtype)
    fused = FusedKernel(classes, F, E, 3)
    assert sum(p is None for p in fused.plan) == (0 if contiguous else 1)
    shapes = {p["shape"] for p in fused.plan if p is not None}
    assert shapes == ({(4, 4), (4, 3), (3, 4), (3, 3)} - ({(3, 3)} if not contiguous else set())
                      if own_loops else {(K.fused.ANY, K.fused.ANY)})
    got = products(fused, Ws, X, s, gu, GZ, bias)
    want = products(BlockKernel(classes, F, E, 3), Ws, X, s, gu, GZ, bias)
    for a, b in zip(got, want):
        assert float((a - b).norm() / b.norm()) <= tol


def test_many_agent_dims_compile_a_few_loop_sets():
    """Dims 1-8 make dozens of block shapes: those with 1/8 of the entries or more get loops of
    their own (at most 8), the rest share the one nest for every shape (a first run on a
    3,000-agent graph of dims 1-8 compiled 192 loops in 75 s before, one loop set now)."""
    from dhdnn.integrator.fused import ANY

    classes, F, E = rank_classes(0, dims=range(1, 9))
    plan = FusedKernel(classes, F, E, 1).plan
    entries = np.array([c.shape[0] * c.shape[1] * c.shape[2] for c in classes])
    own = entries >= entries.sum() / 8
    assert len(classes) > 40 and 0 < own.sum() <= 8  # (seed 0: one shape has its own)
    assert [p["shape"] for p in plan] == [c.shape[1:] if o else (ANY, ANY) for c, o in zip(classes, own)]


def chain(n: int = 600, d: int = 4):
    """One rank holding a chain of ``n`` agents of dim ``d`` (no halo): too sparse for the dense kernel."""
    a = np.arange(n)
    pairs = np.concatenate([np.stack([a, a], 1), np.stack([a[1:], a[:-1]], 1), np.stack([a[:-1], a[1:]], 1)])
    rows, cols = pairs[:, :1] * d + np.arange(d), pairs[:, 1:] * d + np.arange(d)
    return [class_rows(rows, cols, n * d)[0]], n * d


@pytest.mark.parametrize("fused_faster", [True, False])
def test_auto_times_the_fused_kernel_and_keeps_the_faster(monkeypatch, fused_faster):
    """Above the trial size auto times its candidates (here the bands of a chain, the block kernel
    and the fused kernel) and keeps the fastest; where the fused kernel cannot run it is not tried."""
    import dhdnn.integrator.kernels as K

    classes, F = chain()
    mats = {"K_p": classes, "K_q": classes}
    monkeypatch.setattr(K, "FUSED_TRIAL_ENTRIES", 1)
    timed = []  # fused takes 1 s or 3 s, diagonal 2 s, blocks 4 s
    monkeypatch.setattr(K, "trial_seconds", lambda kern, *a: timed.append(kern.name) or
                        {"fused": 1.0 if fused_faster else 3.0, "diagonal": 2.0, "blocks": 4.0}[kern.name])
    name, kernels = build_kernels("auto", mats, F, F, 2)
    assert sorted(timed) == ["blocks", "diagonal", "fused"]
    assert name == ("fused" if fused_faster else "diagonal") and {k.name for k in kernels.values()} == {name}
    monkeypatch.setattr(K.fused, "available", lambda device="cpu": "no numba here")
    timed.clear()
    assert build_kernels("auto", mats, F, F, 2)[0] == "diagonal" and sorted(timed) == ["blocks", "diagonal"]
    timed.clear()
    monkeypatch.undo()  # numba back: on a GPU, and with blocks of 4 made too large, it is not tried
    monkeypatch.setattr(K, "FUSED_TRIAL_ENTRIES", 1)
    monkeypatch.setattr(K, "trial_seconds", lambda kern, *a: timed.append(kern.name) or 1.0)
    build_kernels("auto", mats, F, F, 2, device="cuda")
    assert sorted(timed) == ["blocks", "diagonal"]  # (the fused kernel runs on CPU only)
    timed.clear()
    monkeypatch.setattr(K, "FUSED_MAX_BLOCK", 2)
    build_kernels("auto", mats, F, F, 2)
    assert sorted(timed) == ["blocks", "diagonal"]


def test_the_trial_measures_real_products():
    """``trial_seconds`` runs every product of a layer (a positive time for both kernels)."""
    from dhdnn.integrator.kernels import trial_seconds

    classes, F = chain(200)
    for kern in (FusedKernel(classes, F, F, 1), BlockKernel(classes, F, F, 1)):
        assert 0 < trial_seconds(kern, classes, F, F, torch.float32) < float("inf")


def test_fused_kernel_says_why_it_cannot_run(monkeypatch):
    import dhdnn.integrator.kernels as K

    classes, F = chain(10)
    monkeypatch.setattr(K.fused, "available", lambda device="cpu": "numba is not importable (test)")
    with pytest.raises(RuntimeError, match="run.local_kernel: fused is unavailable: numba is not importable"):
        FusedKernel(classes, F, F, 1)


def test_config_refuses_the_fused_kernel_where_it_cannot_run():
    from dhdnn.config import ConfigError, load_config

    assert load_config(None, ["run.local_kernel=fused"]).run.local_kernel == "fused"
    with pytest.raises(ConfigError, match=r"key 'run.local_kernel': expected a kernel that runs here \(the fused kernel runs on CPU only"):
        load_config(None, ["run.local_kernel=fused", "run.device=cuda"])


def test_a_second_process_loads_the_compiled_loops_from_the_cache(tmp_path):
    """The fused loops compile once per block shape and dtype; a later process loads them from
    numba's on-disk cache (no recompilation), and says how long that took."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, numpy as np; from dhdnn.integrator import fused; "
            "fns = fused._compiled(3, 5, np.float32); "
            "print(json.dumps({'hits': sum(sum(f.stats.cache_hits.values()) for f in fns), "
            "'misses': sum(sum(f.stats.cache_misses.values()) for f in fns), 'seconds': fused.COMPILE['seconds']}))")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      timeout=300, check=True).stdout) for _ in range(2)]
    assert runs[0]["misses"] == 3 and runs[0]["hits"] == 0  # compiled, and written to the cache
    assert runs[1]["misses"] == 0 and runs[1]["hits"] == 3  # loaded
    assert all(r["seconds"] > 0 for r in runs)
    assert any(tmp_path.rglob("*.nbi"))


def chain_with_odd_agents(n: int = 40, n_halo: int = 6, odd=None):
    """Agents of dim 2 in a chain (each coupled to itself and its neighbours), the last six also to
    a halo agent six further on, with agents of dims 3 and 1 inside: after them the 2x2 blocks start
    at odd rows, so bands begin off the multiples of the block size."""
    odd = {10: 3, 25: 1} if odd is None else odd
    dims = np.array([odd.get(i, 2) for i in range(n + n_halo)])
    start = np.concatenate([[0], np.cumsum(dims)[:-1]])
    pairs = {(i, k) for i in range(n) for k in (i - 1, i, i + 1) if 0 <= k < n}
    pairs |= {(i, i + n_halo) for i in range(n - n_halo, n)}
    blocks = {}
    for i, k in sorted(pairs):
        blocks.setdefault((int(dims[i]), int(dims[k])), []).append((i, k))
    classes = []
    for (r, c), ps in sorted(blocks.items()):
        rows = np.array([start[i] + np.arange(r) for i, _ in ps])
        cols = np.array([start[k] + np.arange(c) for _, k in ps])
        classes.append(class_rows(rows, cols, int(dims[:n].sum()))[0])
    return classes, int(dims[:n].sum()), int(dims.sum())


def test_the_diagonal_kernel_equals_the_block_kernel_where_other_dims_shift_the_bands():
    """(Random configs through verify found the diagonal kernel 0.9 off on a 4x4 grid with agents of
    dims 1-3: a band placed at ``slot * r`` instead of the block's own row.) Every product and the
    weight gradients, local and halo bands, in float64."""
    from dhdnn.integrator.kernels import DiagonalKernel, band_coverage

    classes, F, E = chain_with_odd_agents()
    diag = DiagonalKernel(classes, F, E, 3)
    assert diag.bands["local"] and diag.bands["halo"] and band_coverage(diag, classes) > 0.9
    square = [c for c in classes if c.shape[1] == c.shape[2] == 2]
    assert (square[0].rows[:, 0] % 2 == 1).any()  # blocks off the multiples of 2: the case that was wrong
    g = torch.Generator().manual_seed(2)
    Ws = [torch.randn(3, *c.shape, generator=g, dtype=torch.float64) for c in classes]
    Wd = [torch.zeros(3, n, *c.shape[1:], dtype=torch.float64) for n, c in zip(diag.sizes, classes)]
    for W, w, pos in zip(Wd, Ws, diag.positions):
        W[:, pos] = w  # the same blocks at the diagonal kernel's stored positions (zero padding)
    X, GZ = (torch.randn(E, 5, generator=g, dtype=torch.float64) for _ in range(2))
    s, gu = (torch.randn(F, 5, generator=g, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(F, 1, generator=g, dtype=torch.float64)
    got = products(diag, Wd, X, s, gu, GZ, bias)
    want = products(BlockKernel(classes, F, E, 3), Ws, X, s, gu, GZ, bias)
    got = got[:3] + [G[pos] for G, pos in zip(got[3:], diag.positions)]
    for a, b in zip(got, want):
        assert float((a - b).norm() / b.norm()) <= 1e-12


@pytest.mark.parametrize("kind", ["blocks", "diagonal"])
def test_products_in_many_chunks_equal_products_in_one(kind, monkeypatch):
    """The CPU's chunks (cache-sized, here a few blocks each) and a GPU's (few and large, here one)
    compute the same products: every product and the weight gradients, float64."""
    from dhdnn.integrator import kernels as K

    classes, F, E = chain_with_odd_agents() if kind == "diagonal" else rank_classes(3)[:3]
    g = torch.Generator().manual_seed(4)
    X, GZ = (torch.randn(E, 5, generator=g, dtype=torch.float64) for _ in range(2))
    s, gu = (torch.randn(F, 5, generator=g, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(F, 1, generator=g, dtype=torch.float64)
    make = {"blocks": K.BlockKernel, "diagonal": K.DiagonalKernel}[kind]
    sizes = make(classes, F, E, 3).sizes if kind == "diagonal" else [len(c.rows) for c in classes]
    Ws = [torch.randn(3, n, *c.shape[1:], generator=g, dtype=torch.float64) for n, c in zip(sizes, classes)]
    got = {}
    for chunk in (8, 1 << 30):
        monkeypatch.setattr(K, "CHUNK_ELEMENTS", chunk)
        got[chunk] = products(make(classes, F, E, 3), Ws, X, s, gu, GZ, bias)
    for a, b in zip(got[8], got[1 << 30]):
        assert float((a - b).norm() / b.norm()) <= 1e-12
    assert K.chunk_elements(torch.empty(0, device="meta")) == K.DEVICE_CHUNK_ELEMENTS
