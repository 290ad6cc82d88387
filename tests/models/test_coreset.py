import math

import pytest
import torch

from models.coreset import (
    coreset_size,
    covering_radius,
    exhaustive_greedy_kcenter,
    greedy_coreset,
    greedy_kcenter,
    random_projection,
)


def clustered_points(n: int, dim: int, seed: int) -> torch.Tensor:
    """Gaussian blobs of different spreads, a fair stand-in for patch features (clustered, anisotropic)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=generator) * 6
    labels = torch.randint(0, 12, (n,), generator=generator)
    spread = torch.rand(12, 1, generator=generator) + 0.2
    return centres[labels] + torch.randn(n, dim, generator=generator) * spread[labels]


@pytest.mark.parametrize(("n", "dim", "n_select", "seed"), [(500, 8, 40, 0), (3000, 64, 120, 1), (2000, 200, 60, 2)])
def test_pruned_greedy_selects_exactly_what_the_exhaustive_greedy_selects(n, dim, n_select, seed):
    points = clustered_points(n, dim, seed)
    fast = greedy_kcenter(points, n_select, start=seed)
    slow = exhaustive_greedy_kcenter(points, n_select, start=seed)
    assert torch.equal(fast, slow)
    assert covering_radius(points, fast) == covering_radius(points, slow)


def test_greedy_covering_radius_is_within_twice_the_optimum_lower_bound():
    # Greedy k-center is a 2-approximation: r_greedy <= 2 r_opt. The (k+1)-th pick's distance d_{k+1} is a
    # lower bound certificate: r_opt >= d_{k+1} / 2, hence r_greedy <= ... and r_greedy == d_{k+1}.
    points = clustered_points(1500, 16, 3)
    selected = greedy_kcenter(points, 51, start=0)
    radius_50 = covering_radius(points, selected[:50])
    next_distance = torch.cdist(points[selected[50]][None], points[selected[:50]]).min().item()
    assert radius_50 == pytest.approx(next_distance, rel=1e-5)


def test_projected_coreset_covers_nearly_as_well_in_full_dimension():
    points = clustered_points(4000, 256, 4)
    n_select = coreset_size(points.shape[0], 0.02)
    generator = torch.Generator().manual_seed(0)
    approx = greedy_coreset(points, n_select, projection_dim=64, generator=generator)
    exact = exhaustive_greedy_kcenter(points, n_select, start=int(approx[0]))
    assert approx.unique().numel() == n_select
    assert covering_radius(points, approx) <= 1.25 * covering_radius(points, exact)


def test_same_seed_same_selection_other_seed_other_start():
    points = clustered_points(1000, 32, 5)
    first = greedy_coreset(points, 30, generator=torch.Generator().manual_seed(7))
    again = greedy_coreset(points, 30, generator=torch.Generator().manual_seed(7))
    other = greedy_coreset(points, 30, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_projection_leaves_narrow_features_alone_and_shrinks_wide_ones():
    narrow = torch.randn(10, 60)
    assert torch.equal(random_projection(narrow, 32, generator=torch.Generator().manual_seed(0)), narrow)
    assert torch.equal(random_projection(narrow, 0, generator=torch.Generator().manual_seed(0)), narrow)
    wide = torch.randn(10, 300)
    assert random_projection(wide, 32, generator=torch.Generator().manual_seed(0)).shape == (10, 32)


def test_sizes_and_bounds():
    assert coreset_size(1000, 0.01) == 10
    assert coreset_size(5, 0.01) == 1
    assert coreset_size(10, 1.0) == 10
    assert coreset_size(1001, 0.1) == math.ceil(100.1)
    with pytest.raises(ValueError, match="n_select"):
        greedy_coreset(torch.randn(5, 3), 6, generator=torch.Generator())
