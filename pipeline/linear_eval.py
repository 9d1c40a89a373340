"""Linear evaluation of a frozen encoder (PAPER.md section 4.1) and a weighted kNN beside it.

Protocols (params `linear_eval.protocol`):
- `features`: features of the plain train images are computed once; the linear classifier trains on
  them (fast).
- `augmented`: the reference's protocol: every epoch, randomly resized crops + flips of the train
  images pass through the frozen encoder (BatchNorm in eval mode) into the linear classifier.
Either way the optimizer (SGD or LARS) and schedule (warmup-cosine, or ×0.1 at 60% and 80% of the
epochs) are params; the test split is evaluated on plain images (center crop for ImageNet).
"""

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.augment import ViewSpec, augment
from pipeline.knn import knn_scores, topk_accuracy
from pipeline.loaders import eval_loader, ssl_loader
from pipeline.optim import LARS, warmup_cosine
from pipeline.params import LinearEvalParams
from pipeline.pretrain import Run, build_model

Batches = Callable[[int], Iterable[tuple[Tensor, Tensor]]]  # epoch -> (features, labels) batches


@torch.no_grad()
def extract_features(backbone: nn.Module, batches, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """Encoder features h (n, F) and labels (n,) of every image in `batches` (an eval loader)."""
    backbone.eval()
    features, labels = [], []
    for x, y in batches:
        x = (x.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        features.append(backbone(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(features), torch.cat(labels)


def fit_probe(probe: nn.Linear, batches: Batches, steps_per_epoch: int, params: LinearEvalParams) -> nn.Linear:
    """Train `probe` with cross-entropy over `params.epochs` epochs of `batches(epoch)`."""
    if params.optimizer == "lars":
        optimizer = LARS(probe.parameters(), lr=params.lr, momentum=params.momentum,
                         weight_decay=params.weight_decay, eta=0.02, clip_lr=True, exclude_bias_n_norm=True)
    else:
        optimizer = torch.optim.SGD(probe.parameters(), lr=params.lr, momentum=params.momentum,
                                    weight_decay=params.weight_decay)
    total = params.epochs * steps_per_epoch
    for epoch in range(params.epochs):
        for step, (features, labels) in enumerate(batches(epoch)):
            for group in optimizer.param_groups:
                group["lr"] = _lr(epoch * steps_per_epoch + step, total, steps_per_epoch, params)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(probe(features), labels).backward()
            optimizer.step()
    return probe


def _lr(step: int, total: int, steps_per_epoch: int, params: LinearEvalParams) -> float:
    if params.schedule == "step":
        return params.lr * 0.1 ** sum(step >= fraction * total for fraction in (0.6, 0.8))
    return warmup_cosine(step, total, params.warmup_epochs * steps_per_epoch, params.lr, 0.0)


def feature_batches(features: Tensor, labels: Tensor, batch_size: int, seed: int) -> tuple[Batches, int]:
    """Shuffled batches of precomputed features, a new order each epoch."""
    def batches(epoch: int):
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        return ((features[i], labels[i]) for i in order.split(batch_size))
    return batches, -(-len(features) // batch_size)


def augmented_batches(backbone: nn.Module, run: Run, path: Path, batch_size: int, mean: Tensor, std: Tensor,
                      device: torch.device) -> tuple[Batches, int]:
    """Frozen-encoder features of random resized crops + flips of the train images, drawn anew each epoch."""
    loader = ssl_loader(path, batch_size, seed=run.seed, crop_size=run.crop_size if run.decoder_crops else None,
                        device=device)
    view = ViewSpec(run.crop_size, crop=not run.decoder_crops, jitter_p=0.0, grayscale_p=0.0)

    def batches(epoch: int):
        loader.loader.next_epoch = epoch
        generator = torch.Generator(device).manual_seed(run.seed * 100_003 + epoch)
        backbone.eval()
        for x, _, y in loader:
            with torch.no_grad():  # not around the yield: grad mode would stay off in the caller
                features = backbone(augment(x, view, mean, std, generator)).float().cpu()
            yield features, y.cpu()
    return batches, len(loader)


def linear_eval(run: Run, checkpoint: Path | None, data: Path, params: LinearEvalParams, device: torch.device) -> dict:
    """Linear top-1/top-5 and kNN top-1 on the test split of the encoder saved in `checkpoint`; with
    None, of the untrained encoder: the weights `run`'s pretraining starts from (a reference level)."""
    torch.manual_seed(run.seed)  # as `pretrain` does before building the model
    model = build_model(run.method, run.cell, run.variant, run.stem, run.num_classes)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
    backbone = model.backbone.to(device)
    mean, std = torch.tensor(run.mean, device=device), torch.tensor(run.std, device=device)
    crop = run.crop_size if run.decoder_crops else None
    train, test = (extract_features(backbone, eval_loader(data / f"{split}.beton", params.batch_size,
                                                          crop_size=crop, device=device), mean, std)
                   for split in ("train", "test"))
    if params.protocol == "augmented":
        batches, steps = augmented_batches(backbone, run, data / "train.beton", params.batch_size, mean, std, device)
    else:
        batches, steps = feature_batches(*train, params.batch_size, run.seed)
    torch.manual_seed(run.seed)
    probe = fit_probe(nn.Linear(backbone.feature_dim, run.num_classes), batches, steps, params)
    with torch.no_grad():
        logits = probe(test[0])
    knn = knn_scores(*train, test[0], run.num_classes, k=params.knn_k, temperature=params.knn_temperature)
    return {"pretrained": checkpoint is not None, "protocol": params.protocol, "epochs": params.epochs,
            "top1": topk_accuracy(logits, test[1], 1), "top5": topk_accuracy(logits, test[1], 5),
            "knn_top1": topk_accuracy(knn, test[1], 1),
            "n_train": len(train[1]), "n_test": len(test[1])}
