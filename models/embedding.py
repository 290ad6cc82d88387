"""Patch features as in PatchCore (Roth et al., 2022, §3.1).

Each tapped feature map is averaged over a local ``patch_size``² neighbourhood (locally aware patch
features), all maps are aligned to the finest grid, concatenated along channels and, optionally, reduced to
``target_dim`` by adaptive average pooling over the channel axis (parameter-free, so nothing to fit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def aggregate_neighbourhood(features: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Average each position with its ``patch_size``² neighbours; shape kept: (n, c, h, w).

    Border positions average over the neighbours that exist (``count_include_pad=False``), so edges are not
    darkened by zero padding.
    """
    if patch_size == 1:
        return features
    return F.avg_pool2d(features, patch_size, stride=1, padding=patch_size // 2, count_include_pad=False)


def weigh_layer(features: torch.Tensor, how: str) -> torch.Tensor:
    """Balance one tapped layer (n, c, h, w) against the others before concatenation.

    Concatenated as they are, a 112-channel layer outweighs a 40-channel one in every distance by its width
    alone. ``"channels"`` divides by √c, so each layer adds about the same squared distance when its channels
    vary alike; ``"l2"`` scales each patch's vector of that layer to unit length, so each layer adds exactly
    the same at most (magnitudes are lost, directions kept). Both are per patch and parameter-free: nothing is
    fitted, and an image embeds the same in any batch.
    """
    if how == "none":
        return features
    if how == "channels":
        return features / features.shape[1] ** 0.5
    if how == "l2":
        return F.normalize(features, dim=1)
    raise ValueError(f"layer_weighting={how!r} must be 'none', 'channels' or 'l2'")


def embed_patches(
    layer_features: Sequence[torch.Tensor],
    *,
    patch_size: int = 3,
    target_dim: int | None = None,
    align: str = "finest",
    layer_weighting: str = "none",
) -> torch.Tensor:
    """Combine tapped layers into one embedding per patch.

    Args:
        layer_features: feature maps ``(n_images, c_l, h_l, w_l)``; the first has the finest grid.
        patch_size: neighbourhood size of :func:`aggregate_neighbourhood`.
        target_dim: channel count after adaptive average pooling; ``None`` or 0 keeps ``sum(c_l)``.
        align: ``"finest"`` upsamples every map to the finest grid (PatchCore); ``"coarsest"`` pools every
            map down to the coarsest grid — 4× fewer patches per stride halving, so k-NN search and banks
            shrink by that factor squared.

    Returns:
        ``(n_images, h, w, embed_dim)`` float32.
    """
    sizes = [tuple(f.shape[-2:]) for f in layer_features]
    if align == "finest":
        height, width = max(sizes)
    elif align == "coarsest":
        height, width = min(sizes)
    else:
        raise ValueError(f"align={align!r} must be 'finest' or 'coarsest'")
    aligned = []
    for features in layer_features:
        features = aggregate_neighbourhood(features, patch_size)
        if features.shape[-2] > height:
            features = F.adaptive_avg_pool2d(features, (height, width))
        elif features.shape[-2:] != (height, width):
            features = F.interpolate(features, size=(height, width), mode="bilinear", align_corners=False)
        aligned.append(weigh_layer(features, layer_weighting))
    stacked = torch.cat(aligned, dim=1).permute(0, 2, 3, 1)  # (n, h, w, c)
    if target_dim and target_dim != stacked.shape[-1]:
        n_images, h, w, channels = stacked.shape
        flat = stacked.reshape(-1, 1, channels)
        stacked = F.adaptive_avg_pool1d(flat, target_dim).reshape(n_images, h, w, target_dim)
    return stacked.contiguous()
