"""The selection rule (DESIGN.md 2.5) against a plainly written, loop-based reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_flexattention.selection import (
    budget_cells,
    padding_margin_cells,
    pool_cells,
    pooling_windows,
    random_cells,
    select_high_res_tokens,
    token_cells,
)


def reference_selection(attention, grid, high_res_grid, pool, threshold, size=None):
    """The released code's steps, one row at a time, with explicit loops."""
    out = []
    for row in attention:
        amap = row.reshape(grid, grid).clone()
        if size is not None:
            height, width = size
            margin = abs(height - width) // 2
            m = int(margin / max(height, width) * grid)
            if m > 0:
                if width > height:
                    amap[:m, :] = 0
                    amap[grid - m :, :] = 0
                else:
                    amap[:, :m] = 0
                    amap[:, grid - m :] = 0
        low, high = amap.min(), amap.max()
        keep = torch.zeros(grid, grid, dtype=torch.bool)
        if high > low:
            keep = (amap - low) / (high - low) > threshold
        # adaptive max pool: window i covers [floor(i*g/p), ceil((i+1)*g/p))
        pooled = torch.zeros(pool, pool, dtype=torch.bool)
        for i in range(pool):
            for j in range(pool):
                r0, r1 = (i * grid) // pool, math.ceil((i + 1) * grid / pool)
                c0, c1 = (j * grid) // pool, math.ceil((j + 1) * grid / pool)
                pooled[i, j] = keep[r0:r1, c0:c1].any()
        # nearest upsample: high-res cell y maps to pooled floor(y * pool / G)
        full = torch.zeros(high_res_grid, high_res_grid, dtype=torch.bool)
        for y in range(high_res_grid):
            for x in range(high_res_grid):
                full[y, x] = pooled[(y * pool) // high_res_grid, (x * pool) // high_res_grid]
        out.append(full.flatten())
    return torch.stack(out)


@pytest.mark.parametrize("grid,pool,zoom", [(24, 9, 3), (8, 3, 3), (6, 4, 2)])
@pytest.mark.parametrize("threshold", [0.0, 48 / 255, 0.7])
def test_threshold_matches_reference(grid, pool, zoom, threshold):
    attention = torch.rand(5, grid * grid) ** 4
    got = select_high_res_tokens(
        attention, high_res_grid=zoom * grid, selection_grid=pool, mode="threshold", threshold=threshold
    )
    want = reference_selection(attention, grid, zoom * grid, pool, threshold)
    assert torch.equal(got, want)


@pytest.mark.parametrize("size", [(40, 100), (100, 40), (50, 50), (10, 1000)])
def test_padding_margin_matches_reference(size):
    attention = torch.rand(3, 24 * 24)
    sizes = torch.tensor([size] * 3)
    got = select_high_res_tokens(
        attention, high_res_grid=72, selection_grid=9, threshold=48 / 255, original_sizes=sizes
    )
    want = reference_selection(attention, 24, 72, 9, 48 / 255, size=size)
    assert torch.equal(got, want)


def test_margin_cells_follow_the_padded_axis():
    rows, cols = padding_margin_cells(torch.tensor([[40, 100], [100, 40], [50, 50], [-1, -1]]), 24)
    # landscape (W > H) is padded top and bottom: int(30 / 100 * 24) = 7 grid rows each side
    assert rows.tolist() == [7, 0, 0, 0]
    assert cols.tolist() == [0, 7, 0, 0]


def test_a_constant_map_selects_nothing_without_nan():
    attention = torch.full((2, 64), 0.25)
    selected = select_high_res_tokens(attention, high_res_grid=24, selection_grid=3, threshold=0.0)
    assert selected.dtype == torch.bool
    assert not selected.any()


def test_a_map_that_is_zero_outside_the_margin_selects_nothing():
    attention = torch.zeros(1, 8, 8)
    attention[0, 0, :] = 1.0  # only inside the top padding band
    selected = select_high_res_tokens(
        attention.flatten(1), high_res_grid=24, selection_grid=8, original_sizes=torch.tensor([[20, 80]])
    )
    assert not selected.any()


def test_threshold_is_strict():
    attention = torch.tensor([[0.0, 0.5, 1.0, 0.5]])  # normalised: 0, .5, 1, .5
    selected = select_high_res_tokens(attention, high_res_grid=2, selection_grid=2, threshold=0.5)
    assert selected.tolist() == [[False, False, True, False]]


@pytest.mark.parametrize("grid,pool", [(24, 9), (8, 3), (6, 4), (5, 3), (8, 8)])
def test_pooling_windows_equal_adaptive_max_pool(grid, pool):
    maps = torch.rand(4, grid * grid)
    got = pool_cells(maps, pooling_windows(grid, pool))
    want = F.adaptive_max_pool2d(maps.view(4, grid, grid), pool).flatten(1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("pool,high_res_grid", [(9, 72), (3, 24), (4, 12), (5, 12)])
def test_token_cells_follow_nearest_upsampling(pool, high_res_grid):
    cells = torch.arange(pool * pool, dtype=torch.float32).view(1, 1, pool, pool)
    upsampled = F.interpolate(cells, size=(high_res_grid, high_res_grid), mode="nearest").flatten().long()
    assert torch.equal(token_cells(pool, high_res_grid), upsampled)


def test_topk_is_a_budget_of_whole_cells():
    """LLaVA-1.5: topk_ratio=0.1 keeps round(8.1) = 8 of the 81 cells, each 8x8 high-res tokens: 512 per row."""
    assert budget_cells(0.1, 9) == 8
    attention = torch.rand(6, 24 * 24) ** 4
    selected = select_high_res_tokens(attention, high_res_grid=72, selection_grid=9, mode="topk", topk_ratio=0.1)
    assert selected.sum(dim=1).tolist() == [512] * 6
    pooled = F.adaptive_max_pool2d(attention.view(6, 24, 24), 9).flatten(1)
    strongest = pooled.topk(8, dim=1).indices
    kept_cells = selected.view(6, 9, 8, 9, 8).any(dim=(2, 4)).flatten(1)
    assert torch.equal(kept_cells.sum(dim=1), torch.full((6,), 8))
    assert kept_cells.gather(1, strongest).all()


def test_topk_never_spends_its_budget_on_padding():
    """A very wide image leaves few rows of cells inside: the budget keeps only cells that overlap the image."""
    attention = torch.rand(2, 24 * 24)
    sizes = torch.tensor([[100, 1000], [100, 1000]])  # margin: int(450 / 1000 * 24) = 10 rows on each side
    selected = select_high_res_tokens(
        attention, high_res_grid=72, selection_grid=9, mode="topk", topk_ratio=0.5, original_sizes=sizes
    )
    # Low-res rows 10..13 are inside; the pooling windows [8,11) [10,14) [13,16) (coarse rows 3..5, high-res rows
    # 24..47) overlap them: 27 cells, fewer than the budget of round(40.5) = 41, so all of them and nothing else.
    kept_rows = selected.view(2, 72, 72).all(dim=2)
    assert kept_rows[:, 24:48].all() and not selected.view(2, 72, 72)[:, :24].any()
    assert not selected.view(2, 72, 72)[:, 48:].any()
    assert selected.sum(dim=1).tolist() == [27 * 64] * 2


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, 0.001])
def test_a_budget_outside_the_valid_range_is_refused(ratio):
    with pytest.raises(ValueError, match=r"topk_ratio.*\[0\.006173, 1\]"):
        budget_cells(ratio, 9)


def test_topk_ratio_one_selects_everything():
    selected = select_high_res_tokens(torch.rand(2, 64), high_res_grid=24, selection_grid=3, mode="topk", topk_ratio=1)
    assert selected.all()


def test_random_selection_is_seeded_and_respects_p():
    attention = torch.rand(50, 64)
    draws = [
        select_high_res_tokens(
            attention,
            high_res_grid=24,
            selection_grid=8,
            mode="random",
            random_p=0.3,
            random_seed=7,
        )
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])
    fraction = draws[0].float().mean().item()
    assert 0.2 < fraction < 0.4  # 50 rows x 64 cells: the binomial std of the mean is ~0.008
    none = select_high_res_tokens(attention, high_res_grid=24, selection_grid=8, mode="random", random_p=0.0)
    assert not none.any()


def test_non_square_map_is_rejected():
    with pytest.raises(ValueError, match="square"):
        select_high_res_tokens(torch.rand(1, 10), high_res_grid=6, selection_grid=2)


def test_random_cells_are_uniform_and_independent_of_position_seed_and_layer():
    """The counter-based draw: every cell near p over positions; other seeds, layers and positions draw anew."""
    positions = torch.arange(4000)
    draws = random_cells(positions, layer=3, selection_grid=8, p=0.3, seed=0).float()
    per_cell = draws.mean(dim=0)  # binomial std over 4000 draws: 0.0072; 6 sigma is 0.043
    assert (per_cell - 0.3).abs().max() < 0.043, per_cell
    neighbours = (draws[1:] * draws[:-1]).mean()  # independent positions: 0.09
    assert abs(neighbours.item() - 0.09) < 0.01
    for other in (random_cells(positions, 3, 8, 0.3, seed=1), random_cells(positions, 4, 8, 0.3, seed=0)):
        agreement = (other.float() == draws).float().mean().item()
        assert abs(agreement - (0.3**2 + 0.7**2)) < 0.01  # as two independent draws agree
    assert random_cells(positions, 3, 8, 1.0, 0).all() and not random_cells(positions, 3, 8, 0.0, 0).any()
