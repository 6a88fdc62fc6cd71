"""Layer 1: the dense H-DNN family — registry, shapes, masks, fused kernels, regulariser."""
import pytest
import torch

from dhdnn import ARCHITECTURES, build_model
from dhdnn.models import Classifier
from dhdnn.models.hamiltonian import j_matrix

ALL = ["H1", "H2", "MS1", "MS2", "MS3", "ResNet", "MLP"]


def test_registry_has_every_architecture():
    assert sorted(ALL) == sorted(ARCHITECTURES)


@pytest.mark.parametrize("arch", ALL)
def test_shapes_trajectory_and_dtype(arch, f64):
    m = build_model(arch, 6, 5, 0.2)
    y = torch.randn(3, 6)
    out = m(y)
    traj = m.trajectory(y)
    assert out.shape == (3, 6) and len(traj) == 6
    assert torch.equal(traj[0], y)
    # forward (fused for H1/H2) and the step-by-step path agree to round-off
    torch.testing.assert_close(out, traj[-1], rtol=1e-12, atol=1e-12)
    m32 = build_model(arch, 6, 5, 0.2).float()
    assert m32(torch.randn(2, 6, dtype=torch.float32)).dtype == torch.float32
    assert set(m.state_dict()) >= {n for n, _ in m.named_parameters()}


@pytest.mark.parametrize("arch,opts", [("H1", {"J": "J1"}), ("H1", {"J": "J2"}), ("H2", {}),
                                       ("H2", {"X": torch.tensor([[2.0, 0.5, 0], [0, 1, 0], [0.3, 0, 1]])})])
def test_fused_adjoint_matches_autograd_through_step(arch, opts, f64):
    torch.manual_seed(0)
    m = build_model(arch, 6, 7, 0.3, **opts)
    y = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(4, 6)
    g_fused = torch.autograd.grad((m(y) * w).sum(), [y, *m.parameters()])
    g_step = torch.autograd.grad((m.trajectory(y)[-1] * w).sum(), [y, *m.parameters()])
    for a, b in zip(g_fused, g_step):
        # float64, 7 layers: both are exact up to a few ulps of accumulated round-off
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_gradcheck(f64):
    """The integrator's hand-written adjoint, on assembled matrices with K and A apart (H1: one
    field, A = K J^T; H2: two fields), against finite differences."""
    from dhdnn.integrator import Integrate, MatrixKernel, Plan, Workspace, local_maps

    torch.manual_seed(1)
    L, m = 3, 2
    t = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    for arch, width in (("H1", 2 * m), ("H2", m)):
        layout = ARCHITECTURES[arch].layout
        kernels = [MatrixKernel(None, width, width, L, shared=False) for _ in layout.half_steps]
        # (no buffers kept between passes: gradcheck runs backward again after other forwards)
        plan = Plan(layout, 0.2, L, width, width, kernels, local_maps(layout), [2] * len(kernels), ws=Workspace(0))
        nf = len(layout.fields)
        params = [x for _ in layout.half_steps for x in (t(L, width, width), t(L, width, width), t(L, width))]
        for transposed in (False, True):  # the state feature-major (fields x width, B) or batch-major
            y = t(3, nf * width) if transposed else t(nf * width, 3)
            assert torch.autograd.gradcheck(lambda *a: Integrate.apply(plan, transposed, *a), (y, *params))


def test_h2_step_is_the_design_formula(f64):
    torch.manual_seed(2)
    m = build_model("H2", 4, 1, 0.5)
    y = torch.randn(1, 4)
    p, q = y[0, :2], y[0, 2:]
    Kp, Kq, bp, bq = m.K_p[0], m.K_q[0], m.b_p[0], m.b_q[0]
    p_new = p - 0.5 * Kq.T @ torch.tanh(Kq @ q + bq)
    q_new = q + 0.5 * Kp.T @ torch.tanh(Kp @ p_new + bp)
    torch.testing.assert_close(m(y)[0], torch.cat([p_new, q_new]))


def test_h1_step_is_the_design_formula(f64):
    torch.manual_seed(3)
    m = build_model("H1", 4, 1, 0.5, J="J2")
    y = torch.randn(1, 4)
    J = torch.tensor([[0, 1, 1, 1], [-1, 0, 1, 1], [-1, -1, 0, 1], [-1, -1, -1, 0.0]])
    K, b = m.K[0], m.b[0]
    torch.testing.assert_close(m(y)[0], y[0] + 0.5 * J @ K.T @ torch.tanh(K @ y[0] + b))
    assert torch.equal(j_matrix("J1", 4), torch.tensor([[0, 0, 1, 0], [0, 0, 0, 1], [-1, 0, 0, 0], [0, -1, 0, 0.0]]))


def test_masked_entries_stay_exactly_zero_after_100_adam_steps():
    torch.manual_seed(4)
    mp = torch.rand(4, 4) > 0.5
    mq = torch.rand(4, 4) > 0.5
    m = build_model("H2", 8, 6, 0.3, mask={"K_p": mp, "K_q": mq})
    h1 = build_model("H1", 8, 6, 0.3, mask=torch.rand(8, 8) > 0.5)
    opt = torch.optim.Adam([*m.parameters(), *h1.parameters()], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        y = torch.randn(16, 8)
        ((m(y) ** 2).mean() + (h1(y) ** 2).mean() + m.regularizer(1e-2)).backward()
        opt.step()
    assert (m.K_p[:, ~mp] == 0).all() and (m.K_q[:, ~mq] == 0).all()
    assert (h1.K[:, ~h1.mask_K] == 0).all()
    assert (m.K_p[:, mp] != 0).all()  # unmasked entries did train
    assert "mask_K_p" in m.state_dict()


def test_regularizer_matches_hand_computation(f64):
    m = build_model("H1", 2, 3, 0.5)
    with torch.no_grad():
        m.K.copy_(torch.tensor([[[1.0, 0], [0, 0]], [[2.0, 0], [0, 1]], [[2.0, 0], [0, 3]]]))
        m.b.copy_(torch.tensor([[0.0, 0], [1, 0], [1, 2]]))
    # layer 0->1: ||dK||^2 = 1 + 1 = 2, ||db||^2 = 1;  layer 1->2: ||dK||^2 = 4, ||db||^2 = 4
    expected = 0.1 * 0.5 * 0.5 * ((2 + 1) + (4 + 4))
    assert m.regularizer(0.1).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("call,match", [
    (lambda: build_model("H3", 4, 2, 0.1), "unknown architecture"),
    (lambda: build_model("H2", 5, 2, 0.1), "dim must be even"),
    (lambda: build_model("H2", 4, 0, 0.1), "layers: expected a positive integer"),
    (lambda: build_model("H2", 4, 2, -1.0), "h: expected a positive"),
    (lambda: build_model("H1", 4, 2, 0.1, J="J3"), "expected 'J1' or 'J2'"),
    (lambda: build_model("H1", 4, 2, 0.1, mask=torch.ones(3, 3, dtype=torch.bool)), r"expected shape \(4, 4\)"),
    (lambda: build_model("H2", 4, 2, 0.1, mask={"K": torch.ones(2, 2)}), "unknown key"),
    (lambda: build_model("H2", 4, 2, 0.1, X=torch.zeros(2, 2)), "invertible"),
    (lambda: build_model("H2", 4, 2, 0.1, X=torch.eye(3)), r"X: expected a \(2, 2\)"),
    (lambda: build_model("H2", 4, 2, 0.1, bogus=1), "H2:"),
    (lambda: build_model("H2", 4, 2, 0.1)(torch.zeros(3, 5)), r"expected a \(batch, 4\)"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_classifier_places_features_like_the_paper(f64):
    body = build_model("H2", 16, 2, 0.5)
    from dhdnn.models import InputPlacement

    # feature 0 -> p of agent 1 (index 0), feature 1 -> q of agent 5 (index 8 + 4)
    clf = Classifier(body, 2, 2, InputPlacement((0, 12)))
    y0 = clf.initial_state(torch.tensor([[3.0, 7.0]]))
    expected = torch.zeros(1, 16)
    expected[0, 0], expected[0, 12] = 3.0, 7.0
    assert torch.equal(y0, expected)
    default = Classifier(build_model("H2", 4, 2, 0.5), 2, 2)
    assert default.initial_state(torch.tensor([[1.0, 2.0]])).tolist() == [[1.0, 0.0, 0.0, 2.0]]
    assert clf(torch.randn(5, 2)).shape == (5, 2)
    with pytest.raises(ValueError, match="smaller than the 5 input features"):
        Classifier(build_model("H2", 4, 2, 0.5), 5, 2)


def _grads(m, y, mode, anchors=0, state="float"):
    m.set_backprop(mode, anchors, state)
    for p in m.parameters():
        p.grad = None
    yy = y.clone().requires_grad_()
    (m(yy) ** 2).sum().backward()
    return [yy.grad] + [p.grad.clone() for p in m.parameters()]


def _rel(a, b):
    return max(float((x - z).norm() / z.norm()) for x, z in zip(a, b))


@pytest.mark.parametrize("layers,dtype,anchors,tol", [
    (64, torch.float64, 0, 1e-10), (1024, torch.float64, 0, 1e-8),  # exact in exact arithmetic: round-off only
    (1024, torch.float32, 64, 1e-4),  # float32 drift, bounded by anchors every 64 layers
])
def test_float_reversible_backprop_equals_autograd(layers, dtype, anchors, tol):
    torch.manual_seed(0)
    m = build_model("H2", 16, layers, 0.1, init_std=0.5).to(dtype)
    y = torch.randn(32, 16, dtype=dtype)
    assert _rel(_grads(m, y, "reversible", anchors), _grads(m, y, "autograd")) <= tol


def test_reversible_training_equals_autograd_and_needs_an_invertible_layer(f64):
    from dhdnn.models import Classifier

    def train(mode):
        torch.manual_seed(1)
        model = Classifier(build_model("H2", 8, 32, 0.2, init_std=0.5), 2, 2)
        model.body.set_backprop(mode)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(2)
        for _ in range(20):  # an "epoch" of 20 batches
            x, y = torch.randn(16, 2, generator=g), torch.randint(0, 2, (16,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return list(model.parameters())

    for a, b in zip(train("reversible"), train("autograd")):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="H1 layers cannot be inverted exactly"):
        build_model("H1", 4, 2, 0.1).set_backprop("reversible")


def test_inverse_step_undoes_a_layer_and_drift_is_measured(f64):
    from dhdnn.analysis import reconstruction_drift

    torch.manual_seed(0)
    m = build_model("H2", 8, 16, 0.2, init_std=0.5)
    P = m.effective()
    y = torch.randn(5, 8)
    torch.testing.assert_close(m.inverse_step(m.step(y, 3, P), 3, P), y, rtol=1e-12, atol=1e-12)
    d = reconstruction_drift(m, y)
    assert len(d) == 17 and d[-1] == 0 and max(d) < 1e-12
    d32 = reconstruction_drift(m.float(), y.float())
    assert max(d32) > max(d)  # float32 rebuilds drift more


@pytest.mark.parametrize("masked", [False, True])
def test_in_place_regulariser_gradient_equals_autograd(masked, f64, monkeypatch):
    """The regulariser's gradient added after backward (chunk by chunk, no graph) is autograd's."""
    from dhdnn.models import regularizer

    monkeypatch.setattr(regularizer, "SMOOTH_CHUNK", 3)  # several chunks, with overlaps at their ends
    torch.manual_seed(0)
    mask = (torch.rand(4, 4) > 0.4) | torch.eye(4, dtype=torch.bool) if masked else None
    m = build_model("H2", 8, 11, 0.3, mask=mask)
    ref = torch.autograd.grad(m.regularizer(0.7), list(m.parameters()))
    m.add_regularizer_grad(0.7)
    for p, g in zip(m.parameters(), ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.regularizer_value(0.7), m.regularizer(0.7).detach(), rtol=1e-12, atol=1e-12)
