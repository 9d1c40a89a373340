"""Evaluation of the encoder features h (docs/method.md 4.1): the paper's protocol, a fast frozen probe, a kNN.

The paper's protocol (params `linear_eval.<dataset>.<method>.protocol`), as the reference's scripts run it:
- `finetune`: backbone and linear classifier trained together (BatchNorm in train mode) on random resized
  crops + flips of the train images (the reference's `finetune: True` default);
- `augmented`: the backbone frozen in eval mode; the classifier trains on its features of the crops + flips;
- `features`: the classifier trains on features of the plain train images, computed once.
Optimizer (SGD or LARS) and schedule (warmup-cosine, or ×0.1 at given epochs) are params. The test split is
evaluated on plain images (ImageNet: resize 256, center crop 224). Beside it, always: the fast frozen probe
(`features` with `linear_eval.probe`'s settings) and a weighted kNN on the frozen features.
"""

import functools
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.augment import ViewSpec, augment
from pipeline.backbones import ResNet18
from pipeline.checkpoint import encoder_weights, load_checkpoint
from pipeline.errors import UserError
from pipeline.fit import Batches, train
from pipeline.knn import knn_scores, topk_accuracy
from pipeline.loaders import eval_loader, ssl_loader
from pipeline.metrics import LinearEvalMetrics
from pipeline.model import build_backbone, initial_backbone
from pipeline.params import UNTRAINED, FitParams, LinearEvalParams, OptimizerParams, ProtocolParams
from pipeline.run import Run
from pipeline.runtime import autocast, prepare_convolutions, seconds_since_start

log = logging.getLogger(__name__)


@functools.cache
def _log_start() -> None:
    """Once per process: how long start-up took (`bench` reads this line)."""
    log.info("first evaluation batch ready %.1f s after the process started", seconds_since_start())


def load_backbone(run: Run, checkpoint: Path | None) -> ResNet18:
    """The encoder saved in a pretraining `checkpoint`; with None, the one pretraining starts from."""
    if checkpoint is None:
        return initial_backbone(run)
    state = load_checkpoint(checkpoint, "pass the checkpoint.pt a pretraining run wrote")
    backbone = build_backbone(run)
    try:
        backbone.load_state_dict(encoder_weights(state))
    except RuntimeError as e:
        raise UserError(
            f"{checkpoint}: its encoder does not fit pretrain.{run.dataset}.{run.method}.common "
            f"({str(e).splitlines()[0]})"
        ) from None
    return backbone


def linear_eval(
    run: Run,
    backbone: ResNet18,
    data: Path,
    params: LinearEvalParams,
    optimizer: OptimizerParams,
    device: torch.device,
    workers: int = -1,
    channels_last: bool = False,
) -> LinearEvalMetrics:
    """The three evaluations of `backbone` on the test split of `data`; a finetuned backbone is changed in place.
    `workers`: loader threads (FFCV sets torch's threads to the same number); `channels_last`: as pretraining's
    `training.channels_last` (CUDA only)."""
    memory_format = prepare_convolutions(channels_last, device)
    backbone = backbone.to(device).to(memory_format=memory_format)  # eval images come channels_last from FFCV
    setting: ProtocolParams = getattr(getattr(params, run.dataset), run.method)
    mean, std = run.stats(device)
    frozen: dict[str, tuple[Tensor, Tensor]] = {
        split: extract_features(
            backbone,
            eval_loader(
                data / f"{split}.beton", setting.batch_size, workers=workers, crop_size=run.decoder_crop, device=device
            ),
            mean,
            std,
            run.precision,
        )
        for split in ("train", "test")
    }
    knn = knn_scores(
        *frozen["train"], frozen["test"][0], run.num_classes, k=params.knn.k, temperature=params.knn.temperature
    )
    probe = train(
        _classifier(backbone, run, device),
        *feature_batches(*frozen["train"], params.probe, run, device),
        params.probe,
        optimizer,
        "fp32",
        "fast frozen probe",
    )
    with torch.no_grad():
        probe_scores = probe(frozen["test"][0].to(device)).cpu()
    top1, top5 = _protocol(run, backbone, setting, params, optimizer, data, frozen, device, workers, memory_format)
    result = LinearEvalMetrics(
        dataset=run.dataset,
        method=run.method,
        variant=run.variant.name,
        seed=run.seed,
        pretrained=run.variant.name != UNTRAINED,
        protocol=setting.protocol,
        epochs=setting.epochs,
        top1=top1,
        top5=top5,
        probe_top1=topk_accuracy(probe_scores, frozen["test"][1], 1),
        knn_top1=topk_accuracy(knn, frozen["test"][1], 1),
        n_train=len(frozen["train"][1]),
        n_test=len(frozen["test"][1]),
    )
    log.info(
        "%s top-1 %.4f, top-5 %.4f; frozen probe top-1 %.4f; kNN top-1 %.4f",
        setting.protocol,
        result.top1,
        result.top5,
        result.probe_top1,
        result.knn_top1,
    )
    return result


def _protocol(
    run: Run,
    backbone: ResNet18,
    setting: ProtocolParams,
    params: LinearEvalParams,
    optimizer: OptimizerParams,
    data: Path,
    frozen: dict[str, tuple[Tensor, Tensor]],
    device: torch.device,
    workers: int,
    memory_format: torch.memory_format,
) -> tuple[float, float]:
    """Top-1 and top-5 test accuracy of the paper's protocol."""
    classifier = _classifier(backbone, run, device)
    if setting.protocol == "features":
        train(
            classifier,
            *feature_batches(*frozen["train"], setting, run, device),
            setting,
            optimizer,
            "fp32",
            "features protocol",
        )
        with torch.no_grad():
            logits = classifier(frozen["test"][0].to(device)).cpu()
        return topk_accuracy(logits, frozen["test"][1], 1), topk_accuracy(logits, frozen["test"][1], 5)
    view = params.view
    if setting.crop_scale is not None:
        view = view.model_copy(update={"crop_scale": setting.crop_scale})
    spec = ViewSpec.from_params(view, run.crop_size, crop=not run.decoder_crops)
    batches, steps = augmented_batches(
        run, spec, data / "train.beton", setting.batch_size, device, workers, memory_format
    )
    if setting.protocol == "finetune":
        model = nn.Sequential(backbone, classifier)
        train(model, batches, steps, setting, optimizer, run.precision, "finetune")
    else:

        def features(epoch: int):
            backbone.eval()
            for x, y in batches(epoch):
                with torch.no_grad(), autocast(run.precision, device.type):
                    h = backbone(x)
                yield h.float(), y

        train(classifier, features, steps, setting, optimizer, "fp32", "augmented protocol")
    mean, std = run.stats(device)
    test = extract_features(
        backbone,
        eval_loader(
            data / "test.beton", setting.batch_size, workers=workers, crop_size=run.decoder_crop, device=device
        ),
        mean,
        std,
        run.precision,
    )
    with torch.no_grad():
        logits = classifier(test[0].to(device)).cpu()
    return topk_accuracy(logits, test[1], 1), topk_accuracy(logits, test[1], 5)


@torch.no_grad()
def extract_features(backbone: nn.Module, batches, mean: Tensor, std: Tensor, precision: str) -> tuple[Tensor, Tensor]:
    """Encoder features h (n, F) and labels (n,) of every image in `batches` (an eval loader), on the CPU."""
    backbone.eval()
    features, labels = [], []
    for x, y in batches:
        _log_start()
        x = (x.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        with autocast(precision, x.device.type):
            features.append(backbone(x).float().cpu())
        labels.append(y.to("cpu", copy=True))  # FFCV reuses its batch buffers: keep a copy, not a view
    return torch.cat(features), torch.cat(labels)


def _classifier(backbone: ResNet18, run: Run, device: torch.device) -> nn.Linear:
    torch.manual_seed(run.seed)
    return nn.Linear(backbone.feature_dim, run.num_classes).to(device)


def feature_batches(
    features: Tensor, labels: Tensor, fit: FitParams, run: Run, device: torch.device
) -> tuple[Batches, int]:
    """Shuffled batches of precomputed features (moved to `device` once), a new order each epoch."""
    features, labels = features.to(device), labels.to(device)

    def batches(epoch: int):
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(run.epoch_seed(epoch)))
        return ((features[i], labels[i]) for i in order.split(fit.batch_size))

    return batches, -(-len(features) // fit.batch_size)


def augmented_batches(
    run: Run,
    view: ViewSpec,
    path: Path,
    batch_size: int,
    device: torch.device,
    workers: int,
    memory_format: torch.memory_format,
) -> tuple[Batches, int]:
    """Normalized random resized crops + flips of the train images, drawn anew each epoch."""
    loader = ssl_loader(
        path,
        batch_size,
        seed=run.seed,
        workers=workers,
        crop_size=run.decoder_crop,
        crop_scales=(view.crop_scale,),
        device=device,
    )
    mean, std = run.stats(device)

    def batches(epoch: int):
        loader.set_epoch(epoch)
        generator = torch.Generator(device).manual_seed(run.epoch_seed(epoch))
        for x, y in loader:
            yield augment(x, view, mean, std, generator).contiguous(memory_format=memory_format), y

    return batches, len(loader)
