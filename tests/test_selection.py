"""The selection rule (DESIGN.md 2.5) against a plainly written, loop-based reference."""

import math

import pytest
import torch

from hf_flexattention.selection import padding_margin_cells, select_high_res_tokens


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


def test_topk_keeps_a_fixed_fraction_of_cells():
    attention = torch.rand(4, 64)
    selected = select_high_res_tokens(attention, high_res_grid=8, selection_grid=8, mode="topk", topk_ratio=0.25)
    assert selected.sum(dim=1).tolist() == [16] * 4
    strongest = attention.topk(16, dim=1).indices
    assert torch.equal(selected.gather(1, strongest), torch.ones(4, 16, dtype=torch.bool))


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
            generator=torch.Generator().manual_seed(7),
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
