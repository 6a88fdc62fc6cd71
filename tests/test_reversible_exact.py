"""Exact reversible backprop: fixed-point states rebuilt bit for bit, gradients of the fixed-point
forward, overflow stops the run, and the float rebuild's certificate (drift, warning, auto
anchors). Dense here; the sharded engine's exact mode is in test_distributed."""
import pytest
import torch

from dhdnn.models import build_model
from dhdnn.integrator import FRACTION_BITS, FixedPointOverflow

RELATIVE = {torch.float64: 1e-12, torch.float32: 1e-5}


def fixed_point_autograd(model, y, bits):
    """Autograd through the same fixed-point forward: int64 states, each increment computed by the
    same calls in the run's dtype, rounded to the grid 2^-bits with the rounding passed straight
    through (the value is the fixed-point state's; the gradient is the float step's)."""
    scale, inv = 2.0 ** bits, 2.0 ** -bits
    P = model.effective()
    m, h = model.half, model.h
    ints = [torch.round(y[:, :m].detach() * scale).to(torch.int64), torch.round(y[:, m:].detach() * scale).to(torch.int64)]
    graph = [y[:, :m], y[:, m:]]

    def tie(k):  # the value of the int state, the gradient of the graph
        value = ints[k].to(y.dtype) * inv
        graph[k] = value + (graph[k] - graph[k].detach())

    tie(0), tie(1)
    for j in range(model.layers):
        for k, (K, b, sign) in enumerate(((P["K_q"][j], P["b_q"][j], -1), (P["K_p"][j], P["b_p"][j], 1))):
            src = graph[1 - k]
            d = torch.mm(torch.tanh(torch.addmm(b, src, K.T)), K) * h
            ints[k] += sign * torch.round(d.detach() * scale).to(torch.int64)
            graph[k] = graph[k] + sign * d
            tie(k)
    return torch.cat(graph, 1)


def grads(model, y, fn=None):
    yy = y.clone().requires_grad_()
    out = fn(model, yy) if fn is not None else model(yy)
    return torch.autograd.grad(0.5 * out.square().sum(), [yy, *model.parameters()])


def rel(a, b):
    return max(float((x - z).norm() / z.norm()) for x, z in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_rebuilt_state_is_the_forward_state_at_depth_4096(dtype):
    torch.manual_seed(0)
    model = build_model("H2", 16, 4096, 0.0015625, init_std=0.5).to(dtype)
    model.set_backprop("reversible", state="fixed")
    model.certificate.states = {"forward": [], "rebuilt": []}
    y = torch.randn(16, 16, dtype=dtype)
    got = grads(model, y)
    fwd, back = model.certificate.states["forward"], model.certificate.states["rebuilt"]
    # a state after every half-step (2 per layer), the input compared too
    assert len(fwd) == len(back) == 2 * 4096 and model.certificate.checked == 1
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(fwd, reversed(back)))
    # the gradient is the adjoint of this fixed-point forward
    ref = grads(model, y, lambda m, yy: fixed_point_autograd(m, yy, FRACTION_BITS[dtype]))
    assert rel(got, ref) <= RELATIVE[dtype]


@pytest.mark.parametrize("native", [False, True])
def test_either_tanh_form_matches_the_step_model_and_rebuilds_exactly(native, monkeypatch):
    """The integrator's tanh is torch's or ``2 sigmoid(2u) - 1``, whichever this CPU runs faster
    (``NATIVE_TANH``, fixed per machine), so each form is tested here on every machine: autograd
    mode equals the step-by-step model (float32: 1e-5, the forms differ by < 2e-7 per tanh), and
    the exact rebuild is bit for bit, its gradient the fixed-point forward's."""
    monkeypatch.setattr("dhdnn.integrator.stack.NATIVE_TANH", native)
    calls = {"tanh_": 0, "sigmoid_": 0}
    for name in calls:  # count which form runs
        def spy(t, *a, _f=getattr(torch.Tensor, name), _n=name):
            calls[_n] += 1
            return _f(t, *a)
        monkeypatch.setattr(torch.Tensor, name, spy)
    torch.manual_seed(0)
    model = build_model("H2", 16, 64, 0.05, init_std=0.5).float()
    y = torch.randn(16, 16)
    assert rel(grads(model, y), grads(model, y, lambda m, yy: m.trajectory(yy)[-1])) <= RELATIVE[torch.float32]
    model.set_backprop("reversible", state="fixed")
    model.certificate.states = {"forward": [], "rebuilt": []}
    got = grads(model, y)
    fwd, back = model.certificate.states["forward"], model.certificate.states["rebuilt"]
    assert len(fwd) == len(back) == 2 * 64
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(fwd, reversed(back)))
    assert rel(got, grads(model, y, lambda m, yy: fixed_point_autograd(m, yy, FRACTION_BITS[torch.float32]))) <= 1e-5
    # every half-step in the chosen form: the autograd forward's, the reversible forward's, the rebuild's
    assert calls["tanh_" if native else "sigmoid_"] == 3 * 128 and calls["sigmoid_" if native else "tanh_"] == 0


@pytest.mark.parametrize("dtype,layers", [(torch.float64, 8), (torch.float32, 256)])
def test_the_float64_carrier_holds_the_same_integers_as_int64(dtype, layers, monkeypatch):
    """Where the weights bound every state below 2^53 grid units the integers are carried in
    float64: states, output and gradients bit for bit those of the int64 carrier (float64 runs
    have 48 fraction bits, so only small states and few layers fit under 2^53 there)."""
    from dhdnn.integrator import carriers

    def run(carrier_limit):
        monkeypatch.setattr(carriers, "FLOAT_CARRIER_BELOW", carrier_limit)
        torch.manual_seed(0)
        model = build_model("H2", 8, layers, 0.05, init_std=0.5).to(dtype)
        model.set_backprop("reversible", state="fixed")
        model.certificate.states = {"forward": [], "rebuilt": []}
        y = torch.randn(32, 8, dtype=dtype) * 0.1
        return grads(model, y), model(y), model.certificate.states["forward"]

    (g_int, out_int, st_int), (g_flt, out_flt, st_flt) = run(0), run(1 << 53)
    assert st_int[0][0].dtype == torch.int64 and st_flt[0][0].dtype == torch.float64
    assert all(torch.equal(a.double(), b) for sa, sb in zip(st_int, st_flt) for a, b in zip(sa, sb))
    assert torch.equal(out_int, out_flt) and all(torch.equal(a, b) for a, b in zip(g_int, g_flt))


def test_adam_steps_equal_autograd_through_the_fixed_point_forward(f64):
    from dhdnn.models import Classifier

    def train(exact: bool):
        torch.manual_seed(1)
        model = Classifier(build_model("H2", 8, 64, 0.1, init_std=0.5), 2, 2)
        if exact:
            model.body.set_backprop("reversible", state="fixed")
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(2)
        for _ in range(5):
            x, y = torch.randn(16, 2, generator=g), torch.randint(0, 2, (16,), generator=g)
            opt.zero_grad()
            y0 = model.initial_state(x)
            yL = model.body(y0) if exact else fixed_point_autograd(model.body, y0, FRACTION_BITS[torch.float64])
            torch.nn.functional.cross_entropy(model.readout(yL), y).backward()
            opt.step()
        return model.state_dict()

    a, b = train(True), train(False)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-9, msg=k)


def test_a_state_leaving_the_fixed_point_range_stops_with_the_layer():
    torch.manual_seed(0)
    model = build_model("H2", 8, 64, 2.0, init_std=4.0)
    model.set_backprop("reversible", state="fixed", fraction_bits=56)  # a range of 2^6 = 64
    with pytest.raises(FixedPointOverflow, match=r"left the fixed-point range at layer \d+"):
        model(torch.randn(4, 8) * 30).sum().backward()


def test_the_float_rebuild_reports_its_drift():
    """The certificate measures what the issue's table shows: the chaotic row (T = 60) and 4,096
    layers without anchors drift far above the float32 default tolerance (1e-5); anchors every
    64 layers bound it; exact mode's rebuild does not drift."""
    cases = [(8, 200, 0.3, 1.0), (64, 4096, 0.05, 0.3)]
    for dim, layers, h, std in cases:
        torch.manual_seed(0)
        model = build_model("H2", dim, layers, h, init_std=std)
        y = torch.randn(64, dim)
        model.set_backprop("reversible", state="float")
        grads(model, y)
        assert model.certificate.drift > 1e-5, (dim, layers)
    model.set_backprop("reversible", anchor_every=64, state="float")
    grads(model, y)
    assert model.certificate.drift < 1e-5


def test_auto_anchors_bring_the_4096_layer_drift_under_the_tolerance(tmp_path):
    """The README's 4,096-layer float32 network (dim 64, h 0.05) trained with the float rebuild on
    a small 2-D problem (90 + 90 points: the evaluation passes cost what the training does): the
    first epoch's certificate is far above the default tolerance (1e-5) without anchors; ``auto``
    adds anchors (four times as many per epoch above it) until an epoch's drift is below it.
    Recorded in metrics.jsonl and summary.json."""
    import json

    from dhdnn.config import load_config
    from dhdnn.run import train_from_config

    out = tmp_path / "run"
    cfg = load_config(None, ["model.arch=H2", "model.dim=64", "model.layers=4096", "model.h=0.05",
                             "model.init_std=0.3", "data.name=swiss_roll", "data.n_samples=180", "train.epochs=4",
                             "train.batch_size=90", "train.lr=1e-4", "run.backprop=reversible",
                             "run.reversible_state=float", "run.reversible_anchor_every=auto",
                             f"run.out_dir={out}", "run.progress=false"])
    summary = train_from_config(cfg)
    drift = [json.loads(line)["reversible_drift"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert drift[0] > 1e-2 and drift[-1] < 1e-5, drift
    assert summary["reversible_drift"] == max(drift)


def test_analyze_reports_both_rebuilds(capsys):
    from dhdnn.cli import main

    assert main(["analyze", "--backprop", "reversible", "--layers", "64", "--dim", "16", "--h", "0.1",
                 "--batch", "32", "--json"]) == 0
    import json

    r = json.loads(capsys.readouterr().out)
    assert r["exact_grad_error"] <= 1.5 * r["autograd_grad_error"] and 0 < r["float_drift"] < 1e-3
