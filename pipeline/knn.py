"""Weighted k-nearest-neighbour classification on frozen features (InstDisc / solo-learn protocol):
cosine similarity, the k most similar training samples vote for their class with weight exp(sim / T)."""

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores (n_test, num_classes): Σ over the k nearest training samples of exp(cos / T)."""
    train = F.normalize(train_features.float(), dim=1)  # (N, F)
    k = min(k, len(train))
    scores = []
    for chunk in F.normalize(test_features.float(), dim=1).split(chunk_size):
        similarity, index = (chunk @ train.T).topk(k, dim=1)  # (n, k)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp()))
    return torch.cat(scores)


def topk_accuracy(scores: Tensor, labels: Tensor, k: int) -> float:
    """Fraction of samples whose label is among the k highest scores."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).double().mean().item()
