"""Training a classifier with cross-entropy (docs/method.md 4.1): a linear classifier on features, or a
fine-tuned encoder with its classifier. Optimizer (SGD or LARS) and schedule (warmup-cosine, or ×0.1 at given
epochs) come from FitParams; batches from the caller (pipeline.linear_eval; scripts/gpu-check times it)."""

from collections.abc import Callable, Iterable

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.optim import LARS, SGD, warmup_cosine
from pipeline.params import FitParams, OptimizerParams
from pipeline.progress import progress
from pipeline.runtime import autocast

Batches = Callable[[int], Iterable[tuple[Tensor, Tensor]]]  # epoch -> (inputs, labels) batches


def train(
    model: nn.Module,
    batches: Batches,
    steps_per_epoch: int,
    fit: FitParams,
    optimizer: OptimizerParams,
    precision: str,
    description: str,
) -> nn.Module:
    """Train `model` with cross-entropy for `fit.epochs` epochs of `batches(epoch)`; return it in eval mode."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    lr = fit.base_lr * fit.batch_size / 256
    if fit.optimizer == "lars":
        opt: SGD = LARS(
            parameters,
            lr=lr,
            momentum=optimizer.momentum,
            weight_decay=fit.weight_decay,
            eta=optimizer.eta,
            clip_lr=optimizer.clip_lr,
            exclude_bias_n_norm=optimizer.exclude_bias_n_norm,
        )
    else:
        opt = SGD(parameters, lr=lr, momentum=optimizer.momentum, weight_decay=fit.weight_decay)
    total = fit.epochs * steps_per_epoch
    device_type = next(model.parameters()).device.type
    with progress(description, total, "steps") as advance:
        for epoch in range(fit.epochs):
            model.train()
            for step, (x, y) in enumerate(batches(epoch)):
                for group in opt.param_groups:
                    group["lr"] = scheduled_lr(
                        epoch * steps_per_epoch + step, steps_per_epoch, fit, lr, optimizer.warmup_start_lr
                    )
                with autocast(precision, device_type):
                    loss = F.cross_entropy(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                advance(1)
    return model.eval()


def scheduled_lr(step: int, steps_per_epoch: int, fit: FitParams, lr: float, warmup_start_lr: float) -> float:
    if fit.schedule == "step":
        return lr * 0.1 ** sum(step >= epoch * steps_per_epoch for epoch in fit.lr_decay_epochs)
    start = warmup_start_lr if fit.warmup_epochs else lr  # as solo-learn
    return warmup_cosine(step, fit.epochs * steps_per_epoch, fit.warmup_epochs * steps_per_epoch, lr, start)
