import math

import pytest
import torch

from pipeline.knn import knn_scores, topk_accuracy


def test_knn_scores_match_a_direct_vote():
    torch.manual_seed(0)
    train, labels, test = torch.randn(30, 5), torch.randint(0, 4, (30,)), torch.randn(3, 5)
    scores = knn_scores(train, labels, test, num_classes=4, k=7, temperature=0.1, chunk_size=2)
    for i in range(3):
        cosine = [float(test[i] @ train[j] / (test[i].norm() * train[j].norm())) for j in range(30)]
        nearest = sorted(range(30), key=lambda j: -cosine[j])[:7]
        expected = [sum(math.exp(cosine[j] / 0.1) for j in nearest if labels[j] == c) for c in range(4)]
        assert scores[i].tolist() == pytest.approx(expected, rel=1e-4)


def test_knn_is_scale_invariant_and_handles_k_above_n():
    torch.manual_seed(1)
    train, labels, test = torch.randn(10, 3), torch.randint(0, 2, (10,)), torch.randn(4, 3)
    torch.testing.assert_close(
        knn_scores(train, labels, test, 2, k=200), knn_scores(5 * train, labels, test / 3, 2, k=10)
    )


def test_knn_separates_clusters_and_topk_accuracy():
    centers = torch.eye(3) * 10
    train = centers.repeat_interleave(20, 0) + torch.randn(60, 3)
    labels = torch.arange(3).repeat_interleave(20)
    scores = knn_scores(train, labels, centers + 0.1, 3, k=5)
    assert topk_accuracy(scores, torch.arange(3), 1) == 1.0
    assert topk_accuracy(torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.02, 0.08]]), torch.tensor([2, 1]), 2) == 0.5
