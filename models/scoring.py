"""From patch distances to image scores and anomaly maps (PatchCore §3.3)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from models.config import PatchCoreConfig
from models.memory_bank import MemoryBank


def patch_scores(bank: MemoryBank, patches: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Score of each patch = mean L2 distance to its ``k`` nearest bank entries.

    Args:
        patches: (n_patches, embed_dim) float32.

    Returns:
        scores (n_patches,) float32 and the index of each patch's nearest bank entry (n_patches,).
    """
    distances, indices = bank.search(patches, k)
    return distances.mean(axis=1, dtype=np.float32), indices[:, 0]


def reweighted_image_scores(
    bank: MemoryBank,
    patches: np.ndarray,
    scores: np.ndarray,
    nearest: np.ndarray,
    k: int,
) -> np.ndarray:
    """Image scores of PatchCore eq. 7 for a batch.

    With ``m_test*`` an image's patch of maximal score ``s*`` and ``m*`` its nearest bank entry,
    ``s = (1 - exp‖m_test* - m*‖ / Σ_{m ∈ N_k(m*)} exp‖m_test* - m‖) · s*``, where ``N_k(m*)`` are the ``k``
    bank entries nearest to ``m*`` (``m*`` among them). The weight grows when ``m*`` sits in a sparse region
    of the bank, i.e. when the closest nominal patch is itself unusual.

    Args:
        patches: (n_images, n_patches, embed_dim); scores, nearest: (n_images, n_patches).

    Returns:
        (n_images,) float64.
    """
    worst = np.argmax(scores, axis=1)
    rows = np.arange(scores.shape[0])
    s_star = scores[rows, worst].astype(np.float64)
    test_patch = patches[rows, worst]  # m_test*, (n_images, embed_dim)
    m_star = bank.vectors[nearest[rows, worst]]
    _, support = bank.search(m_star, k)  # N_k(m*), (n_images, k)
    distances = np.linalg.norm(bank.vectors[support] - test_patch[:, None, :], axis=2).astype(np.float64)
    shifted = np.exp(distances - distances.max(axis=1, keepdims=True))  # stable softmax
    weight = 1.0 - shifted[:, 0] / shifted.sum(axis=1)
    return weight * s_star


def anomaly_maps(patch_grid: torch.Tensor, image_size: int, sigma: float) -> torch.Tensor:
    """Patch scores (n_images, h, w) → maps (n_images, image_size, image_size), bilinear then Gaussian σ."""
    maps = F.interpolate(
        patch_grid[:, None].float(), size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    if sigma > 0:
        radius = int(4.0 * sigma + 0.5)
        maps = gaussian_blur(maps, kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma])
    return maps[:, 0]


def score_patches(bank: MemoryBank, patches: np.ndarray, config: PatchCoreConfig) -> tuple[np.ndarray, np.ndarray]:
    """One fold on a batch of images' patches (n_images, n_patches, embed_dim): image scores (n_images,),
    float64, and patch scores (n_images, n_patches), float32."""
    n_images, n_patches, dim = patches.shape
    scores, nearest = patch_scores(bank, patches.reshape(-1, dim), config.k)
    scores = scores.reshape(n_images, n_patches)
    nearest = nearest.reshape(n_images, n_patches)
    if config.reweight:
        image_scores = reweighted_image_scores(bank, patches, scores, nearest, config.k)
    else:
        image_scores = scores.max(axis=1).astype(np.float64)
    return image_scores, scores
