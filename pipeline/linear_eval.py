"""Linear evaluation of a frozen encoder (PAPER.md section 4.1), fast protocol: features of the plain
train and test images are computed once, then a linear classifier is trained on them with SGD and a
cosine schedule; a weighted kNN classifier reads the same features.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.knn import knn_scores, topk_accuracy
from pipeline.loaders import eval_loader
from pipeline.params import LinearEvalParams
from pipeline.pretrain import Run, build_model


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


def train_probe(features: Tensor, labels: Tensor, num_classes: int, *, epochs: int, batch_size: int, lr: float,
                momentum: float, weight_decay: float, seed: int) -> nn.Linear:
    """A linear classifier trained on fixed features: SGD with momentum, lr cosine-annealed per step."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(features) / batch_size)
    total = epochs * steps_per_epoch
    for epoch in range(epochs):
        for step, index in enumerate(torch.randperm(len(features), generator=generator).split(batch_size)):
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * (epoch * steps_per_epoch + step) / total))
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(probe(features[index]), labels[index]).backward()
            optimizer.step()
    return probe


@torch.no_grad()
def evaluate_features(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], num_classes: int, *, epochs: int,
                      batch_size: int, lr: float, momentum: float, weight_decay: float, knn_k: int,
                      knn_temperature: float, seed: int) -> dict:
    """Linear-probe top-1/top-5 and kNN top-1 on the test features (accuracies in [0, 1])."""
    with torch.enable_grad():
        probe = train_probe(*train, num_classes, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                            weight_decay=weight_decay, seed=seed)
    logits = probe(test[0])
    knn = knn_scores(*train, test[0], num_classes, k=knn_k, temperature=knn_temperature)
    return {"top1": topk_accuracy(logits, test[1], 1), "top5": topk_accuracy(logits, test[1], 5),
            "knn_top1": topk_accuracy(knn, test[1], 1), "n_train": len(train[1]), "n_test": len(test[1])}


def linear_eval(run: Run, checkpoint: Path, data: Path, params: LinearEvalParams, device: torch.device) -> dict:
    """Evaluate the encoder saved in `checkpoint` (a pretraining run of `run`) on `data`'s splits."""
    model = build_model(run.method, run.cell, run.variant, run.stem, run.num_classes)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
    mean, std = torch.tensor(run.mean, device=device), torch.tensor(run.std, device=device)
    crop = run.crop_size if run.decoder_crops else None
    train, test = (extract_features(model.backbone.to(device), eval_loader(data / f"{split}.beton", params.batch_size,
                                                                            crop_size=crop, device=device), mean, std)
                   for split in ("train", "test"))
    result = evaluate_features(train, test, run.num_classes, epochs=params.epochs, batch_size=params.batch_size,
                               lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay,
                               knn_k=params.knn_k, knn_temperature=params.knn_temperature, seed=run.seed)
    return {"protocol": params.protocol, "epochs": params.epochs} | result
