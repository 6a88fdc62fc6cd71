"""Layer 3 (optional, needs CUDA): the same exactness checks with CUDA tensors.

Runs where a GPU is present; CI machines have none, and every check here has a CPU twin
in the layers below."""
import pytest
import torch

from dhdnn import build_model

from .test_distributed import BATCH, check_locality, check_run, random_topology  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("arch", ["H1", "H2"])
def test_fused_kernels_on_cuda_match_cpu(arch):
    torch.manual_seed(0)
    m = build_model(arch, 8, 16, 0.2).double()
    y = torch.randn(32, 8, dtype=torch.float64, requires_grad=True)
    ref = torch.autograd.grad(m(y).square().sum(), [y, *m.parameters()])
    mc = m.cuda()
    yc = y.detach().cuda().requires_grad_()
    out = torch.autograd.grad(mc(yc).square().sum(), [yc, *mc.parameters()])
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("workers,kernel", [(2, "blocks"), (3, "dense")])
def test_sharded_on_cuda_with_gloo_staging_matches_dense(workers, kernel, random_topology, tmp_path):  # noqa: F811
    topo, results, data = check_run(random_topology, "H2", workers, tmp_path, kernel=kernel, device="cuda")
    check_locality(topo, results, workers, "H2", BATCH, data.n_classes)


def test_sharded_on_cuda_with_nccl_single_rank(random_topology, tmp_path):  # noqa: F811
    # nccl allows one rank per GPU; with one GPU this exercises the nccl path end to end
    check_run(random_topology, "H1", 1, tmp_path, kernel="blocks", device="cuda", backend="nccl")


def test_dense_training_on_cuda(tmp_path):
    from dhdnn.config import load_config
    from dhdnn.run import train_from_config

    cfg = load_config("launch/swiss_roll_H2_64.yaml", ["run.device=cuda", f"run.out_dir={tmp_path / 'r'}",
                                                        "train.epochs=2", "data.n_samples=400", "run.progress=false"])
    s = train_from_config(cfg)
    assert 0 <= s["test_acc"] <= 1
