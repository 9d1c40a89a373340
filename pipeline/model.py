"""The pretrained model of a run: backbone (Z1), projector (Z2), online classifier, and the method's loss."""

import math
from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch
from torch import Tensor, nn

from pipeline.backbones import ResNet18, resnet18
from pipeline.errors import UserError
from pipeline.losses import barlow_twins, nt_xent
from pipeline.optim import LARS
from pipeline.params import BarlowTwinsCommon, SimclrCommon
from pipeline.projectors import Projector, build_head
from pipeline.run import Run


class Loss(Protocol):
    """A method's SSL loss of the two views (pipeline.losses), combined across ranks unless `distributed` is False."""

    def __call__(self, z_a: Tensor, z_b: Tensor, *, distributed: bool = True) -> Tensor: ...


def _simclr(common: SimclrCommon | BarlowTwinsCommon) -> Loss:
    assert isinstance(common, SimclrCommon), type(common)
    return partial(nt_xent, temperature=common.temperature)


def _barlow_twins(common: SimclrCommon | BarlowTwinsCommon) -> Loss:
    assert isinstance(common, BarlowTwinsCommon), type(common)
    return partial(barlow_twins, offdiag_weight=common.offdiag_weight, scale=common.loss_scale)


LOSSES: dict[str, Callable[[SimclrCommon | BarlowTwinsCommon], Loss]] = {
    "simclr": _simclr,
    "barlow_twins": _barlow_twins,
}
# Methods whose training depends on the number of processes W: Barlow Twins normalizes each rank's batch alone and
# its gradient is 1/W of a single process's, as the reference (docs/method.md 3.2). A checkpoint of theirs resumes
# only with the W it was trained with.
DEPENDS_ON_WORLD_SIZE = frozenset({"barlow_twins"})


class SSLModel(nn.Module):
    def __init__(self, backbone: ResNet18, projector: nn.Module, num_classes: int):
        super().__init__()
        self.backbone, self.projector = backbone, projector
        self.classifier = nn.Linear(backbone.feature_dim, num_classes)  # online monitor, on detached h

    def forward(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, ...]:
        """Each view through the backbone separately (batch statistics per view, as the reference)."""
        h_a, h_b = self.backbone(x_a), self.backbone(x_b)  # (N, F) each
        z_a, z_b = self.projector(h_a), self.projector(h_b)  # (N, D) each
        return h_a, h_b, z_a, z_b, self.classifier(torch.cat([h_a, h_b]).detach())


def build_backbone(run: Run) -> ResNet18:
    return resnet18(run.stem, run.common.backbone_width)


def build_model(run: Run) -> SSLModel:
    """The run's model, randomly initialized from the current torch seed; the backbone is made first, so
    it is `initial_backbone(run)`'s whatever the variant."""
    backbone = build_backbone(run)
    try:
        v = run.variant
        head = build_head(
            backbone.feature_dim,
            v.projector_layers,
            v.projector_hidden_dim,
            v.projector_out_dim,
            v.projector_batch_norm,
            v.sae,
        )
    except (RuntimeError, MemoryError) as e:  # the allocator's failure: a projector too large for this machine
        raise UserError(
            f"the projector of pretrain.{run.dataset}.{run.method} (variant {run.variant.name}) does not "
            f"fit in memory ({str(e).splitlines()[0] if str(e) else type(e).__name__}): lower "
            "projector_hidden_dim, projector_out_dim or sae_latent_dim"
        ) from None
    return SSLModel(backbone, Projector(head, run.variant.levels), run.num_classes)


def make_optimizer(model: SSLModel, run: Run) -> LARS:
    """LARS over the backbone and projector (weight decay) and the online classifier (none); lr set per step."""
    o, c = run.optimizer, run.common
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not n.startswith("classifier.")],
            "base_lr": c.base_lr * c.batch_size / 256,
            "weight_decay": c.weight_decay,
        },
        {
            "params": list(model.classifier.parameters()),
            "base_lr": c.classifier_lr * c.batch_size / 256,
            "weight_decay": 0.0,
        },
    ]
    return LARS(
        groups,
        lr=0.0,
        momentum=o.momentum,
        weight_decay=c.weight_decay,
        eta=o.eta,
        clip_lr=o.clip_lr,
        exclude_bias_n_norm=o.exclude_bias_n_norm,
    )


def initial_backbone(run: Run) -> ResNet18:
    """The encoder as pretraining starts it: the untrained reference level."""
    torch.manual_seed(run.seed)
    return build_backbone(run)


def mi_z1_r_estimate(run: Run, loss: Loss, h_a: Tensor, h_b: Tensor) -> Tensor:
    """The estimate of I(Z1;R) the paper's bounds use, from the encoder features of the two views of the global
    batch (gathered from every rank: the loss of these tensors alone, as one process computes it), in nats.

    SimCLR: the InfoNCE lower bound log(K) − L(h_a, h_b), K = 2·batch − 1 candidates per anchor. Barlow Twins has
    no such bound: −L(h_a, h_b), the reference's proxy.
    """
    if run.method == "simclr":
        return math.log(2 * run.common.batch_size - 1) - loss(h_a, h_b, distributed=False)
    return -loss(h_a, h_b, distributed=False)
