import math
import subprocess
import sys

import pytest
import torch

from pipeline.harness import launches
from pipeline.optim import LARS, SGD, warmup_cosine
from tests.helpers import REPO

STEPS = 5


def test_lars_matches_hand_computed_steps():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ‖w‖ = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))  # 1-D: excluded from LARS and weight decay
    lr, wd, eta, mu = 0.5, 0.1, 0.02, 0.9
    opt = LARS([w, b], lr=lr, momentum=mu, weight_decay=wd, eta=eta, clip_lr=True, exclude_bias_n_norm=True)
    g1 = torch.tensor([[0.0, 1.0]])  # ‖g‖ = 1
    w.grad, b.grad = g1.clone(), torch.tensor([2.0])
    opt.step()
    r = min(eta * 5 / (1 + wd * 5 + 1e-8) / lr, 1.0)
    d1 = [(0.0 + wd * 3) * r, (1.0 + wd * 4) * r]
    expected_w = [3.0 - lr * d1[0], 4.0 - lr * d1[1]]
    assert w.tolist()[0] == pytest.approx(expected_w, rel=1e-6)
    assert b.item() == pytest.approx(1.0 - lr * 2.0)  # buffer starts as the first d

    g2 = torch.tensor([[1.0, 0.0]])
    w.grad, b.grad = g2.clone(), torch.tensor([-1.0])
    opt.step()
    p_norm = math.hypot(*expected_w)
    r2 = min(eta * p_norm / (1 + wd * p_norm + 1e-8) / lr, 1.0)
    d2 = [(1.0 + wd * expected_w[0]) * r2, (0.0 + wd * expected_w[1]) * r2]
    buf = [mu * d1[i] + d2[i] for i in range(2)]
    assert w.tolist()[0] == pytest.approx([expected_w[i] - lr * buf[i] for i in range(2)], rel=1e-6)
    assert b.item() == pytest.approx(1.0 - lr * 2.0 - lr * (mu * 2.0 - 1.0))


def lars_reference(params, grads, lrs, weight_decay, eta, clip_lr, exclude_bias_n_norm, momentum=0.9, eps=1e-8):
    """docs/method.md section 4's LARS as a straight line, one parameter at a time, in float64."""
    params, buffers = [p.double() for p in params], [None] * len(params)
    for step_grads, lr in zip(grads, lrs):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            g = g.double()
            p_norm, g_norm = p.norm().item(), g.norm().item()
            d = g
            if not (p.ndim == 1 and exclude_bias_n_norm) and p_norm != 0 and g_norm != 0:
                r = eta * p_norm / (g_norm + weight_decay * p_norm + eps)
                d = (g + weight_decay * p) * (min(r / lr, 1.0) if clip_lr else r)
            buffers[i] = d if buffers[i] is None else momentum * buffers[i] + d
            params[i] = p - lr * buffers[i]
    return params


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("clip_lr", [True, False])
@pytest.mark.parametrize("exclude_bias_n_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lars_matches_the_float64_formula_over_steps(dtype, exclude_bias_n_norm, clip_lr, weight_decay):
    """Matrices, vectors, a parameter that starts at 0 (‖p‖ = 0 at the first step) and one whose gradient is 0
    (‖g‖ = 0: no update, weight decay included), over STEPS steps of varying lr with fixed gradients (no
    feedback: errors add up linearly). Each step rounds ~10 times on the path to p, and the norms of n ≤ 24
    elements add up to n roundings: 50·STEPS unit roundoffs of the parameters' scale bound the difference."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 6), (6,), (3, 2, 2), (5,), (2, 3)]
    start = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    start[4].zero_()
    grads = [[torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes] for _ in range(STEPS)]
    for step_grads in grads:
        step_grads[2].zero_()
    lrs = [0.5 * (step + 1) for step in range(STEPS)]
    options = {"eta": 0.02, "clip_lr": clip_lr, "exclude_bias_n_norm": exclude_bias_n_norm}
    params = [torch.nn.Parameter(p.to(dtype, copy=True)) for p in start]
    opt = LARS(params, lr=0.0, momentum=0.9, weight_decay=weight_decay, **options)
    for step_grads, lr in zip(grads, lrs):
        for p, g in zip(params, step_grads):
            p.grad = g.to(dtype)
        opt.param_groups[0]["lr"] = lr
        opt.step()
    expected = lars_reference([p.to(dtype) for p in start], grads, lrs, weight_decay, **options)
    tolerance = 50 * STEPS * torch.finfo(dtype).eps
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(params[2].detach(), start[2].to(dtype), rtol=0, atol=0)  # ‖g‖ = 0: d = g = 0


def test_a_lars_step_launches_as_many_ops_for_40_tensors_as_for_4():
    """Issue 18 item 8: ~10 ops per parameter tensor in a Python loop made the step launch-bound on a GPU. The
    ops it calls from Python (each a kernel on a GPU: foreach ops are fused there) must not grow with the
    number of tensors."""

    def ops(n):
        params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(n)] + [
            torch.nn.Parameter(torch.randn(8)) for _ in range(n)
        ]
        opt = LARS(params, lr=0.1, momentum=0.9, weight_decay=1e-4, eta=0.02, clip_lr=True, exclude_bias_n_norm=True)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # the momentum buffers' first step
        return launches(opt.step, torch.device("cpu"))["ops"]

    assert ops(40) == ops(4) < 30


def test_lars_clip_caps_the_ratio_at_one():
    w = torch.nn.Parameter(torch.ones(2, 2))
    opt = LARS([w], lr=1e-6, momentum=0.0, weight_decay=0.0, eta=1.0, clip_lr=True, exclude_bias_n_norm=True)
    w.grad = torch.full((2, 2), 0.5)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.ones(2, 2) - 1e-6 * 0.5)  # r = min(huge, 1) = 1


def test_warmup_cosine_endpoints():
    assert warmup_cosine(0, 100, 10, 0.4, 3e-5) == pytest.approx(3e-5)
    assert warmup_cosine(9, 100, 10, 0.4, 3e-5) == pytest.approx(0.4)
    assert warmup_cosine(10, 100, 10, 0.4, 3e-5) == pytest.approx(0.4)
    assert warmup_cosine(55, 100, 10, 0.4, 3e-5) == pytest.approx(0.2)
    assert warmup_cosine(100, 100, 10, 0.4, 3e-5) == pytest.approx(0.0, abs=1e-12)


def test_sgd_matches_torch_sgd():
    torch.manual_seed(0)
    ours, theirs = (torch.nn.Parameter(torch.randn(3, 4)) for _ in range(2))
    theirs.data.copy_(ours.data)
    opt, reference = (
        SGD([ours], lr=0.3, momentum=0.9, weight_decay=0.01),
        torch.optim.SGD([theirs], lr=0.3, momentum=0.9, weight_decay=0.01),
    )
    for step in range(4):
        grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(step))
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        reference.step()
    torch.testing.assert_close(ours.detach(), theirs.detach())


def test_state_dict_round_trip_continues_identically():
    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(2, 2)), torch.nn.Parameter(torch.randn(2))]
        groups = [{"params": params[:1], "base_lr": 1.0}, {"params": params[1:], "weight_decay": 0.0}]
        return params, LARS(
            groups, lr=0.1, momentum=0.9, weight_decay=1e-4, eta=0.02, clip_lr=True, exclude_bias_n_norm=True
        )

    def steps(params, opt, seeds):
        for seed in seeds:
            for k, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * seed + k))
            opt.step()

    params, opt = make()
    steps(params, opt, [0, 1, 2])
    resumed_params, resumed = make()
    steps(resumed_params, resumed, [0])
    saved = resumed.state_dict()
    resumed_params, resumed = make()
    steps(resumed_params, resumed, [0])  # the weights at the save; then the saved optimizer state replaces its own
    resumed.load_state_dict(saved)
    steps(resumed_params, resumed, [1, 2])
    for p, q in zip(params, resumed_params):
        torch.testing.assert_close(p.detach(), q.detach())
    assert saved["param_groups"][1]["weight_decay"] == 0.0 and saved["param_groups"][0]["base_lr"] == 1.0


def test_optimizers_do_not_import_dynamo():
    """torch.optim's optimizers import torch._dynamo (about 3 s of a stage's start-up here)."""
    code = (
        "import sys, torch; from pipeline.optim import LARS, SGD; p = torch.nn.Parameter(torch.ones(2, 2));"
        "p.grad = torch.ones(2, 2); o = LARS([p], lr=0.1, momentum=0.9, weight_decay=0.0, eta=0.02, clip_lr=True,"
        " exclude_bias_n_norm=True); o.step(); o.zero_grad(); o.load_state_dict(o.state_dict());"
        "SGD([p], lr=0.1, momentum=0.9, weight_decay=0.0).step(); print('torch._dynamo' in sys.modules)"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
        ).stdout.strip()
        == "False"
    )
