import math

import pytest
import torch

from pipeline.mutual_info import gram, matrix_mutual_info, renyi_entropy

# The entropies are logs of sums of n² (α = 2) or n·α (eigenvalue) float32 terms in [0, 1]: their relative errors
# are ≲ n²·u (u = 6e-8; n ≤ 16 here: 1.5e-5), below the rel 1e-4 used against the float64 eigenvalue formula.
# Identities of exact inputs (identity, rank one, symmetry, scale invariance) carry only a few roundoffs: 1e-6..1e-5.


def entropy_from_eigenvalues(k, alpha):
    """H_α from the eigenvalues of K/n, in float64."""
    eigenvalues = torch.linalg.eigvalsh(k.double() / len(k)).clamp(min=0)
    return math.log(float((eigenvalues**alpha).sum())) / (1 - alpha)


@pytest.mark.parametrize("alpha", [2, 3, 4])
def test_entropy_of_identity_gram_is_log_n(alpha):
    assert renyi_entropy(torch.eye(10), alpha).item() == pytest.approx(math.log(10), rel=1e-6)


def test_entropy_of_rank_one_gram_is_zero():
    assert renyi_entropy(torch.ones(6, 6), 2).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("alpha", [2, 3])
def test_entropy_matches_eigenvalue_formula(alpha):
    torch.manual_seed(0)
    k = gram(torch.randn(12, 5))
    assert renyi_entropy(k, alpha).item() == pytest.approx(entropy_from_eigenvalues(k, alpha), rel=1e-4)


def test_alpha_2_is_minus_log_frobenius():
    torch.manual_seed(1)
    k = gram(torch.randn(9, 4))
    assert renyi_entropy(k, 2).item() == pytest.approx(-math.log(float((k**2).sum()) / 81), rel=1e-6)


def test_non_integer_alpha_is_refused():
    with pytest.raises(ValueError, match="renyi_alpha must be an integer >= 2"):
        renyi_entropy(torch.eye(3), 1)


def test_mutual_info_formula_and_properties():
    torch.manual_seed(2)
    h, z = torch.randn(16, 32), torch.randn(16, 8)
    k_h, k_z = gram(h), gram(z)
    expected = sum(entropy_from_eigenvalues(k, 2) for k in (k_h, k_z)) - entropy_from_eigenvalues(k_h * k_z, 2)
    assert matrix_mutual_info(h, z).item() == pytest.approx(expected, rel=1e-4)
    assert matrix_mutual_info(z, h).item() == pytest.approx(matrix_mutual_info(h, z).item(), rel=1e-6)
    assert matrix_mutual_info(3 * h, z / 7).item() == pytest.approx(matrix_mutual_info(h, z).item(), rel=1e-5)
    assert matrix_mutual_info(h, torch.ones(16, 8)).item() == pytest.approx(0.0, abs=1e-5)  # constant z: nothing shared


def test_mutual_info_is_float32_under_autocast_and_has_gradients():
    torch.manual_seed(3)
    h = torch.randn(8, 16, requires_grad=True)
    z = torch.randn(8, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = matrix_mutual_info(h @ torch.eye(16), z)
    assert value.dtype == torch.float32
    value.backward()
    assert h.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
