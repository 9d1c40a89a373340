"""Matrix-based Rényi entropy and mutual information (docs/method.md section 3.3), the paper's regularizer.

For n samples with L2-normalized rows, the Gram matrix K (n × n) has a unit diagonal, and
H_α(K) = 1/(1−α) · log tr((K/n)^α), with the *matrix* power. The mutual information of two
representations of the same samples is I = H(K1) + H(K2) − H(K1 ∘ K2) (∘: Hadamard product).
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def gram(x: Tensor) -> Tensor:
    """K = x̂ x̂ᵀ with x̂ the L2-normalized rows of x: (n, D) -> (n, n), unit diagonal; float32 (float64 stays)."""
    x = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=1)
    return x @ x.T


def renyi_entropy(gram: Tensor, alpha: int) -> Tensor:
    """H_α(K) = 1/(1−α) · log tr((K/n)^α) for an integer α ≥ 2 (α = 2: −log(‖K‖²_F / n²))."""
    if not (isinstance(alpha, int) and alpha >= 2):
        raise ValueError(f"renyi_alpha must be an integer >= 2, got {alpha!r}")
    a = gram / gram.shape[0]
    trace = (a * a.T).sum() if alpha == 2 else torch.linalg.matrix_power(a, alpha).diagonal().sum()
    return torch.log(trace) / (1 - alpha)


def matrix_mutual_info(h: Tensor, z: Tensor, alpha: int = 2) -> Tensor:
    """I(h; z) from the Gram matrices of two representations (n, ·) of the same n samples, in float32
    even under autocast."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        k_h, k_z = gram(h), gram(z)
        return renyi_entropy(k_h, alpha) + renyi_entropy(k_z, alpha) - renyi_entropy(k_h * k_z, alpha)
