"""Merge math (pure tensor functions) against the plain reference and on invariants."""
import pytest
import torch

from mergepass.merge import adjacent_merge, checkerboard, global_merge, unmerge, window_merge
from reference import merge_tokens_adjacent, merge_tokens_global, merge_tokens_windows


def _groups_from_source(source_b, n_out):
    groups = [[] for _ in range(n_out)]
    for i, j in enumerate(source_b.tolist()):
        groups[j].append(i)
    return groups


def _check_against_reference(x, k, y, s, src, ref_fn, prefix, **kw):
    for b in range(x.shape[0]):
        n = x.shape[1]
        rx, rs, rg = ref_fn(x[b], k[b], [1.0] * n, [[i] for i in range(n)], prefix, **kw)
        torch.testing.assert_close(y[b], rx, rtol=1e-5, atol=1e-5)
        assert s[b, :, 0].tolist() == rs
        assert _groups_from_source(src[b], y.shape[1]) == rg


def _invariants(x, y, s, src, prefix):
    n = x.shape[1]
    assert torch.all(s.sum(1) == n), "token sizes must sum to the original count"
    assert torch.all(s[:, :prefix] == 1), "protected tokens never merge"
    torch.testing.assert_close(y[:, :prefix], x[:, :prefix])
    assert torch.all(src[:, :prefix] == torch.arange(prefix))
    for b in range(x.shape[0]):  # every output token is the mean of the tokens it holds
        for j, g in enumerate(_groups_from_source(src[b], y.shape[1])):
            torch.testing.assert_close(y[b, j], x[b, g].mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("n_patch,r", [(16, 3), (15, 7), (36, 18), (9, 0)])
def test_global_merge_matches_reference(prefix, n_patch, r):
    x, k = torch.randn(3, prefix + n_patch, 8), torch.randn(3, prefix + n_patch, 6)
    y, s, src = global_merge(x, k, None, None, r=r, prefix=prefix)
    assert y.shape[1] == prefix + n_patch - r
    _invariants(x, y, s, src, prefix)
    _check_against_reference(x, k, y, s, src, merge_tokens_global, prefix, r=r)


def test_global_merge_r0_is_identity():
    x, k = torch.randn(2, 17, 8), torch.randn(2, 17, 8)
    y, s, src = global_merge(x, k, None, None, r=0, prefix=1)
    assert y.shape == x.shape and torch.all(s == 1)
    torch.testing.assert_close(unmerge(y, src), x)


def test_merge_with_sizes_is_weighted_average():
    x, k = torch.randn(2, 11, 4), torch.randn(2, 11, 4)
    y1, s1, src1 = global_merge(x, k, None, None, r=3, prefix=1)
    y2, s2, src2 = global_merge(y1, torch.randn(2, 8, 4), s1, src1, r=2, prefix=1)
    _invariants(x, y2, s2, src2, 1)
    torch.testing.assert_close(unmerge(y2, src2)[:, 0], x[:, 0])


@pytest.mark.parametrize("grid,windows,r,prefix", [((6, 6), (2, 2), 3, 1), ((5, 7), (2, 2), 3, 1),
                                                   ((4, 4), (2, 1), 2, 0), ((7, 7), (2, 2), 4, 2)])
def test_window_merge_matches_reference(grid, windows, r, prefix):
    n = prefix + grid[0] * grid[1]
    x, k = torch.randn(2, n, 8), torch.randn(2, n, 6)
    y, s, src = window_merge(x, k, None, None, r=r, prefix=prefix, grid=grid, windows=windows)
    _invariants(x, y, s, src, prefix)
    _check_against_reference(x, k, y, s, src, merge_tokens_windows, prefix, r=r, grid=grid, windows=windows)


def test_window_merge_never_crosses_windows():
    grid, prefix = (8, 8), 1
    x, k = torch.randn(4, 65, 8), torch.randn(4, 65, 8)
    y, s, src = window_merge(x, k, None, None, r=6, prefix=prefix, grid=grid, windows=(2, 2))
    for b in range(4):
        for g in _groups_from_source(src[b], y.shape[1])[prefix:]:
            quads = {((i - prefix) // 8 // 4, (i - prefix) % 8 // 4) for i in g}
            assert len(quads) == 1, f"group {g} spans windows {quads}"


def test_window_merge_after_global_merge_uses_tracked_locations():
    grid = (6, 6)
    x, k = torch.randn(2, 37, 8), torch.randn(2, 37, 8)
    y1, s1, src1 = global_merge(x, k, None, None, r=5, prefix=1)
    k2 = torch.randn(2, 32, 8)
    y2, s2, src2 = window_merge(y1, k2, s1, src1, r=2, prefix=1, grid=grid, windows=(2, 2))
    _invariants(x, y2, s2, src2, 1)
    # reference applied on the merged state
    for b in range(2):
        groups = _groups_from_source(src1[b], y1.shape[1])
        rx, rs, rg = merge_tokens_windows(y1[b], k2[b], s1[b, :, 0].tolist(), groups, 1, r=2, grid=grid, windows=(2, 2))
        torch.testing.assert_close(y2[b], rx, rtol=1e-5, atol=1e-5)
        assert _groups_from_source(src2[b], y2.shape[1]) == rg


@pytest.mark.parametrize("grid,r,prefix", [((6, 6), 10, 1), ((4, 5), 10, 0), ((7, 7), 24, 2)])
def test_adjacent_merge_matches_reference_and_is_connected(grid, r, prefix):
    n = prefix + grid[0] * grid[1]
    x, k = torch.randn(2, n, 8), torch.randn(2, n, 6)
    y, s, src = adjacent_merge(x, k, None, None, r=r, prefix=prefix, grid=grid)
    assert y.shape[1] == n - r
    _invariants(x, y, s, src, prefix)
    _check_against_reference(x, k, y, s, src, merge_tokens_adjacent, prefix, r=r, grid=grid)
    w = grid[1]
    for b in range(2):
        for g in _groups_from_source(src[b], y.shape[1])[prefix:]:
            cells = {i - prefix for i in g}
            seen, todo = set(), [min(cells)]
            while todo:  # flood fill inside the group: it must reach every member
                c = todo.pop()
                if c in seen:
                    continue
                seen.add(c)
                y0, x0 = divmod(c, w)
                todo += [d for d in cells if abs(d // w - y0) + abs(d % w - x0) == 1]
            assert seen == cells, f"group {sorted(cells)} is not 4-connected"


def test_checkerboard_adjacency():
    a, b, adj = checkerboard((3, 3))
    assert a == [0, 2, 4, 6, 8] and b == [1, 3, 5, 7]
    assert adj[a.index(4)].all()  # the centre touches all four edge midpoints
    assert adj.sum().item() == 12  # edges of a 3x3 grid
