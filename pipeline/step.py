"""One pretraining step (docs/method.md sections 3-4), with no host synchronization: logged values stay on the device.

Two augmented views -> backbone h (Z1) -> projector z (Z2, after the optional SAE and quantizer) -> SSL loss
(+ λ·I(Z1;Z2) for variants with the MI regularizer) + the online linear classifier's loss on detached h.
Logged with it: I(Z1;Z2), H(Z1) (of the Gram matrix K1), the estimate of I(Z1;R), the online train accuracy.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distributed import gather_views, sum_over_ranks
from pipeline.model import LOSSES, mi_z1_r_estimate
from pipeline.mutual_info import gram, matrix_mutual_info, renyi_entropy
from pipeline.run import Run
from pipeline.runtime import autocast, world_size

LOGGED = ("ssl_loss", "mi_z1_z2", "mi_z1_r_estimate", "entropy_z1", "online_train_acc")  # Forward.logged, in order


@dataclass(frozen=True)
class Forward:
    h: tuple[Tensor, Tensor]  # encoder features of the two views, (N, F) each
    ssl: Tensor  # the SSL loss
    regularizer: Tensor | None  # λ·I(Z1;Z2), None without the MI regularizer
    classification: Tensor  # the online classifier's cross-entropy
    logged: Tensor  # (len(LOGGED),) float32 (float64 for a float64 model), detached


def forward(model: nn.Module, run: Run, x_a: Tensor, x_b: Tensor, y: Tensor) -> Forward:
    """The step's losses from this rank's batch; I(Z1;Z2) (the regularizer and its log), H(Z1) and the I(Z1;R)
    estimate from the global batch (h and z gathered from every rank), so they do not depend on the number of
    processes. Logged values are this rank's: their mean over ranks is the global batch's."""
    loss = LOSSES[run.method](run.common)
    with autocast(run.precision, x_a.device.type):
        h_a, h_b, z_a, z_b, logits = model(x_a, x_b)
    ssl = loss(z_a, z_b)  # float32 inside, autocast off
    h, z = gather_views(h_a, h_b), gather_views(z_a, z_b)  # (2N, F), (2N, D): the global batch
    with torch.set_grad_enabled(torch.is_grad_enabled() and run.variant.mi_weight > 0):
        mi = matrix_mutual_info(h, z, run.common.renyi_alpha)  # float32 inside
    targets = torch.cat([y, y])
    classification = F.cross_entropy(logits.float(), targets)
    with torch.no_grad():
        estimate = mi_z1_r_estimate(run, loss, *h.detach().chunk(2))
        entropy = renyi_entropy(gram(h.detach()), run.common.renyi_alpha)
        accuracy = (logits.argmax(1) == targets).float().mean()
        logged = torch.stack([ssl.detach(), mi.detach(), estimate, entropy, accuracy])
    regularizer = run.variant.mi_weight * mi if run.variant.mi_weight > 0 else None
    return Forward((h_a, h_b), ssl, regularizer, classification, logged)


def backward(out: Forward, run: Run, parameters: list[nn.Parameter]) -> None:
    """Gradients of the total loss into `parameters`' .grad (which must be None: zero_grad(set_to_none=True)).

    With `mi_grad_fp32` under bf16, the regularizer's gradient is computed by its own backward pass (which
    fires no DDP hooks) and stored in .grad (fp32), then the SSL backward adds to it there: the two never
    meet in a bf16 tensor, where a term ~1e-6 of the other rounds away. DDP then all-reduces the sum.
    """
    main = out.ssl + out.classification
    if out.regularizer is None:
        main.backward()
    elif run.variant.mi_grad_fp32 and run.reduced_precision:
        grads = torch.autograd.grad(out.regularizer, parameters, retain_graph=True, allow_unused=True)
        for p, g in zip(parameters, grads):
            p.grad = g
        main.backward()
    else:
        (main + out.regularizer).backward()


def gradient_ratio(out: Forward, run: Run) -> Tensor:
    """‖λ·∂I(Z1;Z2)/∂h‖ / ‖∂L_ssl/∂h‖ at the encoder output (0 without the regularizer): below the training
    precision's unit roundoff (params.UNIT_ROUNDOFF), the regularizer rounds away where the two gradients are summed."""
    if out.regularizer is None:
        return torch.zeros((), device=out.ssl.device)
    ssl = torch.autograd.grad(out.ssl, out.h, retain_graph=True)
    regularizer = torch.autograd.grad(out.regularizer, out.h, retain_graph=True)
    return _norm(regularizer) / _norm(ssl)


def _norm(tensors: tuple[Tensor, ...]) -> Tensor:
    """The norm of this rank's `tensors` together, over every rank's."""
    local = torch.linalg.vector_norm(torch.cat([t.float().flatten() for t in tensors]))
    return local if world_size() == 1 else sum_over_ranks(local.square()).sqrt()
