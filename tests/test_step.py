"""The training step on CPU along the CUDA code path: bf16 autocast, torch.compile, no host synchronization,
and the MI regularizer's gradient, rounded away in bf16 unless it gets its own backward pass."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.augment import ViewSpec, augment_torch, draw
from pipeline.metrics import DatasetMetrics
from pipeline.model import LOSSES, build_model, make_optimizer, mi_z1_r_estimate
from pipeline.params import UNIT_ROUNDOFF, load_params
from pipeline.run import make_run
from pipeline.step import LOGGED, backward, forward, gradient_ratio
from tests.helpers import tiny_params

META = DatasetMetrics(
    dataset="synthetic",
    classes=[f"c{k}" for k in range(10)],
    num_classes=10,
    storage={},
    sources_sha256={},
    train={"count": 10, "per_class": [1] * 10},
    test={"count": 10, "per_class": [1] * 10},
    image_shape=[32, 32, 3],
    mean=[0.5] * 3,
    std=[0.25] * 3,
)
# Ops that make the host wait for a CUDA device: reading a value (item, bool, tolist), data-dependent shapes,
# and tensors made from Python data inside the step (a synchronous host-to-device copy).
SYNCING = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "unique",
    "_unique2",
    "repeat_interleave",
    "lift_fresh",
    "equal",
    "is_nonzero",
}


class SyncOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        masks = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )  # nonzero on CUDA
        if name in SYNCING or masks:
            self.found.append(func.__name__)
        return func(*args, **(kwargs or {}))


def tiny_run(tmp_path, variant="mi_reg", precision="fp32", method="simclr"):
    run = make_run(
        load_params(tiny_params(tmp_path / "p.yaml")), "synthetic", method, variant, 0, META, torch.device("cpu")
    )
    return run.__class__(**(run.__dict__ | {"precision": precision}))


def batch(seed=0, n=16):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, 32, 32, generator=generator),
        torch.randn(n, 3, 32, 32, generator=generator),
        torch.randint(0, 10, (n,), generator=generator),
    )


def grads(run, model, mode, x=None):
    """Backbone gradients of one step: `ssl` (no regularizer), `joint` (one backward of the sum), `separate`."""
    x = x or batch()
    model.zero_grad(set_to_none=True)
    out = forward(model, run, *x)
    if mode == "ssl":
        out = out.__class__(**(out.__dict__ | {"regularizer": None}))
    variant = run.variant.__class__(**(run.variant.__dict__ | {"mi_grad_fp32": mode == "separate"}))
    backward(out, run.__class__(**(run.__dict__ | {"variant": variant})), list(model.parameters()))
    return torch.cat([p.grad.flatten() for p in model.backbone.parameters()]), out


def rounding_bound(model, run, x):
    """First-order bound on how far the SSL loss moves when every tensor autocast stores in bf16 is rounded:
    rounding a tensor a to relative precision u moves L by at most u · Σ|a|·|∂L/∂a| (to first order), so the
    bound is u · Σ over the weights, the input images and every layer's output of Σ|a|·|∂L/∂a|, computed in
    float64. Each module's output is counted; the ops between modules (residual sums, pooling, the loss's
    normalization and similarity products) round tensors of the same sizes once more: a factor 2 covers them."""
    model = model.double()
    outputs = []

    def keep(module, inputs, output):
        output.retain_grad()
        outputs.append(output)

    hooks = [m.register_forward_hook(keep) for m in model.modules() if not list(m.children())]
    x_a, x_b, y = (t.double().requires_grad_() if t.is_floating_point() else t for t in x)
    out = forward(model, run, x_a, x_b, y)
    out.ssl.backward()
    for hook in hooks:
        hook.remove()
    tensors = [*model.parameters(), x_a, x_b, *outputs]
    total = sum(float((t.detach() * t.grad).square().sum()) for t in tensors if t.grad is not None)
    return out.ssl.item(), 2 * 6 * UNIT_ROUNDOFF["bf16"] / 3**0.5 * total**0.5


@pytest.mark.parametrize("method", ["simclr", "barlow_twins"])
def test_bf16_step_on_cpu_is_within_its_rounding_of_float64(tmp_path, method):
    """bf16 autocast on the CPU (the CUDA code path) against the same step in float64, within the first-order
    rounding bound of `rounding_bound`. One step, not several against fp32: training is chaotic, and the
    kernels a CPU picks (AMX, AVX-512, AVX2) move its rounding, so only one step's error has a bound that
    holds on every machine (issue 17: over 3 steps bf16 and fp32 were 15% apart on an AMX CPU)."""
    torch.manual_seed(0)
    model = build_model(tiny_run(tmp_path, method=method))
    exact, bound = rounding_bound(copy.deepcopy(model), tiny_run(tmp_path, precision="fp32", method=method), batch())
    bf16 = tiny_run(tmp_path, precision="bf16", method=method)
    out = forward(model, bf16, *batch())
    assert abs(out.ssl.item() - exact) <= bound, (out.ssl.item(), exact, bound)
    optimizer = make_optimizer(model, bf16)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"]
    for step in range(3):  # and it trains: every logged value finite
        out = forward(model, bf16, *batch(step))
        optimizer.zero_grad(set_to_none=True)
        backward(out, bf16, list(model.parameters()))
        optimizer.step()
        assert torch.isfinite(out.logged).all()


def with_mi_weight(run, mi_weight):
    return run.__class__(
        **(run.__dict__ | {"variant": run.variant.__class__(**(run.variant.__dict__ | {"mi_weight": mi_weight}))})
    )


def regularizer_gradient(model, run):
    """∂(λ·I(Z1;Z2))/∂θ of the backbone, alone, in fp32."""
    out = forward(model, run, *batch())
    return torch.cat([g.flatten() for g in torch.autograd.grad(out.regularizer, list(model.backbone.parameters()))])


@pytest.mark.parametrize("method", ["simclr", "barlow_twins"])
def test_ssl_loss_of_a_bf16_step_is_the_float32_loss_of_its_projections(tmp_path, method):
    """Regression (issue 18, item 5): the SSL loss ran in bf16 inside autocast. Now: the model in bf16, the loss
    (and the I(Z1;R) estimate) in float32 from the same bf16 projections (features), bit for bit."""
    run = tiny_run(tmp_path, precision="bf16", method=method)
    torch.manual_seed(0)
    model = build_model(run)
    projections = []
    model.projector.register_forward_hook(lambda module, args, z: projections.append(z))
    out = forward(model, run, *batch())
    assert [z.dtype for z in projections] == [torch.bfloat16] * 2 and out.h[0].dtype == torch.bfloat16
    loss = LOSSES[method](run.common)
    assert torch.equal(out.ssl, loss(*(z.float() for z in projections)))
    estimate = mi_z1_r_estimate(run, loss, *(h.float() for h in out.h))
    assert torch.equal(out.logged[LOGGED.index("mi_z1_r_estimate")], estimate)


def test_regularizer_rounds_away_in_bf16_unless_it_has_its_own_backward(tmp_path):
    """One step, bounds that hold on any CPU. At λ = 1e-4 the regularizer's gradient at h is ~2e-6 of the SSL
    gradient's, 1000 times below bf16's unit roundoff: summed into the bf16 gradient at h it rounds away (a
    correctly rounded addition: bit for bit here). Given its own backward, it is the fp32 gradient up to the error
    of a bf16 backward through the network, calibrated on the same step: the SSL gradient's own bf16-against-fp32
    error (~1/3 here, for both). In one fp32 backward the sum keeps it, beside the SSL gradient's fp32 rounding
    (measured ~15·u·‖∂L_ssl/∂θ‖, u = 6e-8: half the regularizer's gradient at λ = 1e-4, a twentieth at λ = 1e-3,
    where cosine > 0.9 tolerates 8 times that noise)."""
    fp32 = tiny_run(tmp_path, precision="fp32")
    torch.manual_seed(0)
    model = build_model(fp32)
    expected = regularizer_gradient(model, fp32)

    bf16 = tiny_run(tmp_path, precision="bf16")
    ssl, out = grads(bf16, model, "ssl")
    joint, _ = grads(bf16, model, "joint")
    separate, _ = grads(bf16, model, "separate")
    ratio = gradient_ratio(forward(model, bf16, *batch()), bf16)
    assert 0 < ratio < UNIT_ROUNDOFF["bf16"] / 100  # what the report flags
    assert (joint - ssl).norm() < 0.05 * expected.norm()  # the regularizer's gradient is lost in bf16
    kept = separate - ssl  # kept with its own backward: the fp32 gradient up to a bf16 backward's error
    bf16_error = (ssl - grads(fp32, model, "ssl")[0]).norm() / ssl.norm()
    assert (kept - expected).norm() / expected.norm() < 1.5 * bf16_error < 1
    fp32 = with_mi_weight(fp32, 1e-3)
    fp32_joint = grads(fp32, model, "joint")[0] - grads(fp32, model, "ssl")[0]
    assert torch.nn.functional.cosine_similarity(fp32_joint, regularizer_gradient(model, fp32), dim=0) > 0.9


def test_compiled_step_matches_eager(tmp_path):
    run = tiny_run(tmp_path, precision="bf16")
    torch.manual_seed(0)
    model = build_model(run)
    eager = forward(model, run, *batch()).logged
    compiled = forward(torch.compile(model, backend="aot_eager", fullgraph=True), run, *batch())
    compiled.ssl.backward()
    torch.testing.assert_close(compiled.logged, eager, rtol=1e-3, atol=1e-3)


def test_channels_last_forward_matches_contiguous(tmp_path):
    """The forward pass agrees. Gradients do not, on CPU: oneDNN's channels_last backward through the whole
    ResNet-18 is 0.3% from float64 where the contiguous one is 5e-6 (measured here), so channels_last stays
    CUDA-only (scripts/gpu-check compares the two on a GPU)."""
    run = tiny_run(tmp_path)
    run = run.__class__(**(run.__dict__ | {"common": run.common.model_copy(update={"backbone_width": 8})}))
    logged = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = build_model(run).to(memory_format=memory_format)
        x_a, x_b, y = batch()
        with torch.no_grad():
            out = forward(
                model, run, x_a.contiguous(memory_format=memory_format), x_b.contiguous(memory_format=memory_format), y
            )
        logged.append(out.logged)
    torch.testing.assert_close(logged[1], logged[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["mi_reg", "sae", "discrete"])
def test_a_step_makes_the_host_wait_nowhere(tmp_path, variant):
    """Augmentation (the device path), forward, both backward passes, LARS: no op that needs a host sync."""
    run = tiny_run(tmp_path, variant=variant, precision="bf16")
    run = run.__class__(
        **(run.__dict__ | {"variant": run.variant.__class__(**(run.variant.__dict__ | {"mi_grad_fp32": True}))})
    )
    torch.manual_seed(0)
    model = build_model(run)
    optimizer = make_optimizer(model, run)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"]
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    mean, std = run.stats(torch.device("cpu"))
    views = run.views()
    x_a, x_b = (augment_torch(images, view, draw(16, (32, 32), view, generator), mean, std) for view in views)  # warm
    with SyncOps() as ops:
        x_a, x_b = (augment_torch(images, view, draw(16, (32, 32), view, generator), mean, std) for view in views)
        out = forward(model, run, x_a, x_b, torch.randint(0, 10, (16,)))
        gradient_ratio(out, run)
        optimizer.zero_grad(set_to_none=True)
        backward(out, run, list(model.parameters()))
        optimizer.step()
    assert ops.found == []


def test_the_sync_detector_sees_item_and_boolean_masks():
    with SyncOps() as ops:
        x = torch.arange(4.0)
        x[x > 1].sum().item()
        x[x > 2] = 0
        torch.tensor([1.0])
    assert set(ops.found) == {"index.Tensor", "_local_scalar_dense.default", "index_put_.default", "lift_fresh.default"}


def test_view_spec_has_no_hidden_defaults():
    with pytest.raises(TypeError):
        ViewSpec(32, True)  # every field comes from params
