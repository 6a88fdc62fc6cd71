"""Layer 1: H2's symplectic guarantee at depth, and the vanishing it prevents."""
import torch

from dhdnn import build_model, sensitivity_norms
from dhdnn.analysis import sensitivity_matrices, symplectic_form, symplecticity_error


def test_h2_depth_512_is_symplectic_with_norms_at_least_one(f64):
    torch.manual_seed(0)
    m = build_model("H2", 8, 512, 0.1)
    bsm = sensitivity_matrices(m, torch.randn(8))
    # relative error: round-off level even though ||M|| grows large
    assert symplecticity_error(bsm[0]) <= 1e-10
    for M in bsm:
        assert symplecticity_error(M) <= 1e-10
    norms = torch.stack([torch.linalg.matrix_norm(M, ord=2) for M in bsm])
    assert (norms >= 1 - 1e-9).all()
    assert norms.max() > 10  # random weights do amplify: the floor, not a trivial identity map


def test_h2_with_general_x_preserves_its_own_form(f64):
    torch.manual_seed(1)
    X = torch.eye(2) + 0.3 * torch.randn(2, 2)
    m = build_model("H2", 4, 64, 0.1, X=X)
    M = sensitivity_matrices(m, torch.randn(4))[0]
    assert symplecticity_error(M, symplectic_form(4, X=X)) <= 1e-10


def test_h1_is_not_symplectic(f64):
    torch.manual_seed(0)
    m = build_model("H1", 8, 512, 0.1)
    M = sensitivity_matrices(m, torch.randn(8))[0]
    assert symplecticity_error(M) > 1e-6


def test_mlp_gradients_vanish_at_depth_64(f64):
    torch.manual_seed(0)
    m = build_model("MLP", 16, 64, 1.0)
    norms = sensitivity_norms(m, torch.randn(16))
    assert norms[0] < 1e-3
    assert norms[-1] == 1.0
