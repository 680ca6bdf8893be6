"""Merge math (pure tensor functions and the fused CPU kernel) against the plain reference and on
invariants."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mergepass.merge import adjacent_merge, checkerboard, global_merge, unmerge, window_merge
from mergepass.merge import fused
from helpers import require_fused_merge, threads
from reference import merge_tokens_adjacent, merge_tokens_adjacent_paper, merge_tokens_global, merge_tokens_windows


def _fused(fn):
    def call(*args, **kw):
        require_fused_merge()
        return fn(*args, **kw)
    call.__name__ = fn.__name__
    return call


GLOBAL = [pytest.param(global_merge, id="reference"), pytest.param(_fused(fused.fused_global_merge), id="fused")]
WINDOW = [pytest.param(window_merge, id="reference"), pytest.param(_fused(fused.fused_window_merge), id="fused")]
ADJACENT = [pytest.param(adjacent_merge, id="reference"),
            pytest.param(_fused(fused.fused_adjacent_merge), id="fused")]


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


@pytest.mark.parametrize("merge", GLOBAL)
@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("n_patch,r", [(16, 3), (15, 7), (36, 18), (9, 0)])
def test_global_merge_matches_reference(merge, prefix, n_patch, r):
    x, k = torch.randn(3, prefix + n_patch, 8), torch.randn(3, prefix + n_patch, 6)
    y, s, src = merge(x, k, None, None, r=r, prefix=prefix)
    assert y.shape[1] == prefix + n_patch - r
    _invariants(x, y, s, src, prefix)
    _check_against_reference(x, k, y, s, src, merge_tokens_global, prefix, r=r)


@pytest.mark.parametrize("merge", GLOBAL)
def test_global_merge_r0_is_identity(merge):
    x, k = torch.randn(2, 17, 8), torch.randn(2, 17, 8)
    y, s, src = merge(x, k, None, None, r=0, prefix=1)
    assert y.shape == x.shape and torch.all(s == 1)
    torch.testing.assert_close(unmerge(y, src), x)


@pytest.mark.parametrize("merge", GLOBAL)
def test_merge_with_sizes_is_weighted_average(merge):
    x, k = torch.randn(2, 11, 4), torch.randn(2, 11, 4)
    y1, s1, src1 = merge(x, k, None, None, r=3, prefix=1)
    y2, s2, src2 = merge(y1, torch.randn(2, 8, 4), s1, src1, r=2, prefix=1)
    _invariants(x, y2, s2, src2, 1)
    torch.testing.assert_close(unmerge(y2, src2)[:, 0], x[:, 0])


@pytest.mark.parametrize("grid,windows,r,prefix", [((6, 6), (2, 2), 3, 1), ((5, 7), (2, 2), 3, 1),
                                                   ((4, 4), (2, 1), 2, 0), ((7, 7), (2, 2), 4, 2)])
@pytest.mark.parametrize("merge", WINDOW)
def test_window_merge_matches_reference(merge, grid, windows, r, prefix):
    n = prefix + grid[0] * grid[1]
    x, k = torch.randn(2, n, 8), torch.randn(2, n, 6)
    y, s, src = merge(x, k, None, None, r=r, prefix=prefix, grid=grid, windows=windows)
    _invariants(x, y, s, src, prefix)
    _check_against_reference(x, k, y, s, src, merge_tokens_windows, prefix, r=r, grid=grid, windows=windows)


@pytest.mark.parametrize("merge", WINDOW)
def test_window_merge_never_crosses_windows(merge):
    grid, prefix = (8, 8), 1
    x, k = torch.randn(4, 65, 8), torch.randn(4, 65, 8)
    y, s, src = merge(x, k, None, None, r=6, prefix=prefix, grid=grid, windows=(2, 2))
    for b in range(4):
        for g in _groups_from_source(src[b], y.shape[1])[prefix:]:
            quads = {((i - prefix) // 8 // 4, (i - prefix) % 8 // 4) for i in g}
            assert len(quads) == 1, f"group {g} spans windows {quads}"


@pytest.mark.parametrize("merge", WINDOW)
def test_window_merge_after_global_merge_uses_tracked_locations(merge):
    grid = (6, 6)
    x, k = torch.randn(2, 37, 8), torch.randn(2, 37, 8)
    y1, s1, src1 = global_merge(x, k, None, None, r=5, prefix=1)
    k2 = torch.randn(2, 32, 8)
    y2, s2, src2 = merge(y1, k2, s1, src1, r=2, prefix=1, grid=grid, windows=(2, 2))
    _invariants(x, y2, s2, src2, 1)
    # reference applied on the merged state
    for b in range(2):
        groups = _groups_from_source(src1[b], y1.shape[1])
        rx, rs, rg = merge_tokens_windows(y1[b], k2[b], s1[b, :, 0].tolist(), groups, 1, r=2, grid=grid, windows=(2, 2))
        torch.testing.assert_close(y2[b], rx, rtol=1e-5, atol=1e-5)
        assert _groups_from_source(src2[b], y2.shape[1]) == rg


@pytest.mark.parametrize("merge", ADJACENT)
@pytest.mark.parametrize("grid,r,prefix", [((6, 6), 10, 1), ((4, 5), 10, 0), ((7, 7), 24, 2)])
def test_adjacent_merge_matches_reference_and_is_connected(merge, grid, r, prefix):
    n = prefix + grid[0] * grid[1]
    x, k = torch.randn(2, n, 8), torch.randn(2, n, 6)
    y, s, src = merge(x, k, None, None, r=r, prefix=prefix, grid=grid)
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


@pytest.mark.parametrize("merge", ADJACENT)
@pytest.mark.parametrize("grid,r,prefix", [((6, 6), 10, 1), ((4, 5), 7, 0), ((7, 7), 24, 2)])
def test_adjacent_merge_softmax_matches_the_papers_rule(merge, grid, r, prefix):
    """similarity="softmax": the pairs that merge are those the paper's directed softmax of the
    post-attention tokens ranks best (tests/reference.py, written from the paper and its code); the
    fused op gives the same (it runs the reference ops for this similarity)."""
    torch.manual_seed(1)
    n = prefix + grid[0] * grid[1]
    x = torch.randn(2, n, 8) * 1.5
    y, s, src = merge(x, x, None, None, r=r, prefix=prefix, grid=grid, similarity="softmax")
    assert y.shape[1] == n - r
    _invariants(x, y, s, src, prefix)
    for b in range(2):
        rx, rs, rg = merge_tokens_adjacent_paper(x[b], [1.0] * n, [[i] for i in range(n)], prefix, r, grid)
        torch.testing.assert_close(y[b], rx, rtol=1e-5, atol=1e-5)
        assert s[b, :, 0].tolist() == rs
        assert _groups_from_source(src[b], y.shape[1]) == rg
    cos = merge(x, x, None, None, r=r, prefix=prefix, grid=grid, similarity="cosine")
    assert not torch.equal(cos[2], src), "the softmax similarity chose the cosine's pairs: the test cannot tell"


def test_adjacent_merge_softmax_is_directed():
    """The score of A token a for neighbour b is a's own attention row (normalised over a's row), not
    b's: a token with one huge-norm neighbour prefers it, whatever that neighbour's row says."""
    from mergepass.merge import checkerboard, softmax_similarity
    grid = (3, 3)
    a_ids, b_ids, _ = checkerboard(grid)
    m = torch.randn(1, 9, 4)
    ia, ib = torch.tensor(a_ids), torch.tensor(b_ids)
    logp = softmax_similarity(m, ia, ib)
    full = (m[0] @ m[0].T).log_softmax(-1)
    torch.testing.assert_close(logp[0], full[ia][:, ib])
    assert not torch.allclose(logp[0], full[ib][:, ia].T), "rows and columns must not be interchangeable"


def test_adjacent_merge_rejects_an_unknown_similarity():
    x = torch.randn(1, 10, 4)
    with pytest.raises(ValueError, match="similarity"):
        adjacent_merge(x, x, None, None, r=2, prefix=1, grid=(3, 3), similarity="dot")


def test_checkerboard_adjacency():
    a, b, adj = checkerboard((3, 3))
    assert a == [0, 2, 4, 6, 8] and b == [1, 3, 5, 7]
    assert adj[a.index(4)].all()  # the centre touches all four edge midpoints
    assert adj.sum().item() == 12  # edges of a 3x3 grid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_kernel_equals_reference_functions_chained(dtype):
    """LGTM's schedule shape on ViT-like widths (two window merges with padding, then global ones):
    the fused kernel gives the reference path's tokens, sizes and source maps (same matching)."""
    require_fused_merge()
    x = torch.randn(4, 1 + 14 * 14, 96, dtype=dtype)
    ref = fus = (x, None, None)
    steps = [(window_merge, fused.fused_window_merge, dict(r=6, windows=(2, 2), grid=(14, 14)))] * 2
    steps += [(global_merge, fused.fused_global_merge, dict(r=r)) for r in (16, 40)]
    for ref_fn, fused_fn, kw in steps:
        k = torch.randn(4, ref[0].shape[1], 32, dtype=dtype)
        ref = ref_fn(ref[0], k, ref[1], ref[2], prefix=1, **kw)
        fus = fused_fn(fus[0], k, fus[1], fus[2], prefix=1, **kw)
        assert fus[0].dtype == dtype and fus[1].dtype == dtype
        torch.testing.assert_close(fus[0], ref[0])
        torch.testing.assert_close(fus[1], ref[1])
        assert torch.equal(fus[2], ref[2])
    _invariants(x, fus[0], fus[1], fus[2], 1)


def test_fused_kernel_rejects_inconsistent_sets():
    require_fused_merge()
    x, k = torch.randn(1, 9, 4), torch.randn(1, 9, 4)
    size, src = torch.ones(1, 9, 1), torch.arange(9)[None]
    op = torch.ops.mergepass.bipartite_merge
    with pytest.raises(RuntimeError, match="must equal the token count"):
        op(x, k, size, src, torch.tensor([[[1, 3]]]), torch.tensor([[[2, 4]]]), None, 1, 1)
    with pytest.raises(RuntimeError, match="distinct tokens after the prefix"):
        op(x, k, size, src, torch.tensor([[[0, 1, 3, 5]]]), torch.tensor([[[2, 4, 6, 8]]]), None, 1, 1)
    with pytest.raises(RuntimeError, match="no B token to merge into"):
        op(x, k, size, src, torch.tensor([[[1, 2, 3, 4], [5, 6, 7, 8]]]), torch.tensor([[[-1], [-1]]]), None, 1, 1)
    with pytest.raises(RuntimeError, match="exceeds a group's 4 A tokens"):
        op(x, k, size, src, torch.arange(1, 9, 2)[None, None], torch.arange(2, 9, 2)[None, None], None, 5, 1)


@pytest.mark.parametrize("prefix", [1, 2])
@pytest.mark.parametrize("use_fused", [False, True])
def test_sequence_partition_reproduces_official_tome(prefix, use_fused):
    """``partition = "sequence"`` is facebookresearch/ToMe's own split; ``"patches"`` equals it only
    for an even prefix (class + distillation token)."""
    from mergepass.merge import global_merge
    from reference import tome_official_merge
    if use_fused:
        require_fused_merge()
    fn = fused.fused_global_merge if use_fused else global_merge
    torch.manual_seed(prefix)
    x, metric = torch.randn(2, 48 + prefix, 16), torch.randn(2, 48 + prefix, 8)
    size = torch.rand(2, 48 + prefix, 1) + 0.5
    ref_x, ref_s = tome_official_merge(x, metric, size, r=10, class_token=True, distill_token=prefix == 2)
    ours = {part: fn(x, metric, size, None, r=10, prefix=prefix, offset=prefix % 2 if part == "sequence" else 0)
            for part in ("sequence", "patches")}
    # the protected tokens keep their own rows; official ToMe keeps them too, ordered within A and B
    if prefix == 1:
        assert torch.allclose(ours["sequence"][0], ref_x, atol=1e-5) and torch.allclose(ours["sequence"][1], ref_s)
        assert not torch.allclose(ours["patches"][0], ref_x, atol=1e-3)
    else:  # even prefix: both splits are ToMe's; its distillation token sits first in B, ours stays at 1
        for part in ("sequence", "patches"):
            got = ours[part][0]
            assert torch.allclose(got[:, :1], ref_x[:, :1], atol=1e-5)
            keep = 48 // 2 + 1 - 10
            assert torch.allclose(got[:, 2:keep + 1], ref_x[:, 1:keep], atol=1e-5)
            assert torch.allclose(got[:, 1], ref_x[:, keep], atol=1e-5)
            assert torch.allclose(got[:, keep + 1:], ref_x[:, keep + 1:], atol=1e-5)


def test_position_tables_are_read_at_each_tokens_first_original_position():
    from mergepass.merge import gather_positions, representatives
    torch.manual_seed(0)
    b, n0, n = 3, 9, 5
    # random source maps: the protected token 0 stays in slot 0; every other slot holds at least one
    # of the original tokens 1..n0-1
    source = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(
        [torch.arange(1, n), torch.randint(1, n, (n0 - n,))])[torch.randperm(n0 - 1)]]) for _ in range(b)])
    rep = representatives(source, n)
    for i in range(b):
        for j in range(n):
            assert rep[i, j].item() == min(t for t in range(n0) if source[i, t] == j)
    bias = torch.randn(1, 2, n0, n0)
    got = gather_positions(bias, source, (2, 3), 0, n, 4)
    rope = torch.randn(n0 - 1, 4)  # rows for the tokens after one protected token
    rows = gather_positions(rope, source, (2,), 1, n, 4)
    for i in range(b):
        p = rep[i].tolist()
        assert torch.equal(got[i], bias[0][:, p][:, :, p])
        assert torch.equal(rows[i, 0], rope[[q - 1 for q in p[1:]]])


def test_protected_tokens_neither_merge_away_nor_absorb_others():
    from mergepass.merge import global_merge
    torch.manual_seed(1)
    x, metric = torch.randn(2, 21, 8), torch.randn(2, 21, 6)
    prefix, k = 1, 3
    top = metric[:, prefix:].norm(dim=-1).topk(k, dim=-1).indices + prefix
    _, size, source = global_merge(x, metric, None, None, r=7, prefix=prefix, protect=k)
    assert size.shape[1] == 21 - 7 and float(size.sum()) == 2 * 21
    for b in range(2):
        for t in top[b].tolist():
            slot = source[b, t]
            assert int((source[b] == slot).sum()) == 1 and float(size[b, slot]) == 1.0


def test_protection_by_a_mask_is_protection_by_the_tokens_it_marks():
    """``protect`` as a [B, M] mask protects exactly the tokens a count would pick when it marks the same ones, and
    other marked tokens when it marks others."""
    from mergepass.merge.ops import largest_norms
    torch.manual_seed(2)
    x, metric = torch.randn(2, 21, 8), torch.randn(2, 21, 6)
    by_count = global_merge(x, metric, None, None, r=7, prefix=1, protect=3)
    by_mask = global_merge(x, metric, None, None, r=7, prefix=1, protect=largest_norms(metric[:, 1:], 3))
    for want, got in zip(by_count, by_mask):
        assert torch.equal(want, got)
    marked = torch.zeros(2, 20, dtype=torch.bool)
    marked[:, [0, 5, 11]] = True
    _, size, source = global_merge(x, metric, None, None, r=7, prefix=1, protect=marked)
    for b in range(2):
        for t in (1, 6, 12):
            slot = source[b, t]
            assert int((source[b] == slot).sum()) == 1 and float(size[b, slot]) == 1.0


def test_fused_kernel_protects_the_same_tokens_as_the_reference():
    from mergepass.merge import global_merge
    from mergepass.merge.fused import fused_global_merge
    require_fused_merge()
    torch.manual_seed(2)
    x, metric = torch.randn(3, 30, 8), torch.randn(3, 30, 6)
    for offset in (0, 1):
        want = global_merge(x, metric, None, None, r=9, prefix=2, offset=offset, protect=4)
        got = fused_global_merge(x, metric, None, None, r=9, prefix=2, offset=offset, protect=4)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def _nan_row(x, k, token):
    x, k = x.clone(), k.clone()
    x[:, token], k[:, token] = float("nan"), float("nan")
    return x, k


@pytest.mark.parametrize("r", [3, 5])
def test_nan_metric_row_has_no_partner_in_kernel_and_reference(r):
    """A token whose metric is NaN has no permitted partner: it ranks last, stays unmerged when it can
    (r = 3) and, when all 5 A tokens must leave (r = 5), is dropped rather than averaged into a token."""
    require_fused_merge()
    x, k = _nan_row(torch.randn(2, 11, 8), torch.randn(2, 11, 6), 1)  # token 1: the first A token
    ref = global_merge(x, k, None, None, r=r, prefix=1)
    got = fused.fused_global_merge(x, k, None, None, r=r, prefix=1)
    for g, w in zip(got, ref):
        torch.testing.assert_close(g, w, equal_nan=True)
    y, size, src = got
    if r == 3:  # kept, unmerged, in its own slot
        assert int(size[0, src[0, 1]]) == 1 and y[:, src[0, 1]].isnan().all()
        assert int(y.isnan().any(-1).sum()) == 2, "the NaN token must not spread into another one"
    else:  # dropped: its entries follow the first B token, which it did not join
        assert not y.isnan().any() and float(size.sum()) == 2 * 10
        assert torch.equal(src[:, 1], src[:, 2])


@pytest.mark.parametrize("r", [2, 6])
def test_all_false_allowed_row_never_merges_in_kernel_and_reference(monkeypatch, r):
    """An A token that ``allowed`` forbids every partner is not merged into B[0] (r = 2), and when every
    A token must leave (r = 6) it is dropped; the kernel and the reference agree."""
    require_fused_merge()
    a_ids, b_ids, adj = checkerboard((3, 4))
    adj[0] = False
    from mergepass.merge import ops
    monkeypatch.setattr(ops, "checkerboard", lambda grid: (a_ids, b_ids, adj))
    monkeypatch.setattr(fused, "checkerboard", lambda grid: (a_ids, b_ids, adj))
    torch.manual_seed(3)
    x, k = torch.randn(2, 13, 8), torch.randn(2, 13, 6)
    ref = adjacent_merge(x, k, None, None, r=r, prefix=1, grid=(3, 4))
    got = fused.fused_adjacent_merge(x, k, None, None, r=r, prefix=1, grid=(3, 4))
    for g, w in zip(got, ref):
        torch.testing.assert_close(g, w)
    y, size, src = got
    t = 1 + a_ids[0]
    if r == 2:
        assert torch.all(size.gather(1, src[:, t, None, None]) == 1)
        torch.testing.assert_close(y[torch.arange(2), src[:, t]], x[:, t])
    else:
        assert torch.all(size.sum(1) == 12), "the partnerless token joins no average"


def test_fused_kernel_partnerless_row_with_padding_first_b_slot():
    """The B set starts with a padding slot (-1) and an A token has no permitted partner (NaN metric, or
    an all-False ``allowed`` row): no out-of-bounds access, and the result equals the unpadded call's.
    Run in a child process: the unfixed kernel wrote through the padding slot."""
    code = textwrap.dedent("""
        import torch
        from mergepass.merge import fused
        assert fused.kernel_error() is None, fused.kernel_error()
        op = torch.ops.mergepass.bipartite_merge
        torch.manual_seed(0)
        x, k = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
        size, src = torch.ones(2, 9, 1), torch.arange(9).expand(2, 9)
        a = torch.tensor([[[1, 3, 5, 7]]])
        b, b_pad = torch.tensor([[[2, 4, 6, 8]]]), torch.tensor([[[-1, 2, 4, 6, 8]]])
        xn, kn = x.clone(), k.clone()
        xn[:, 1], kn[:, 1] = float("nan"), float("nan")
        allowed = torch.ones(4, 4, dtype=torch.bool)
        allowed[0] = False
        allowed_pad = torch.cat([torch.zeros(4, 1, dtype=torch.bool), allowed], dim=1)
        for r in (2, 4):
            cases = [((xn, kn, size, src, a, b_pad, None, r, 1), (xn, kn, size, src, a, b, None, r, 1)),
                     ((x, k, size, src, a, b_pad, allowed_pad, r, 1), (x, k, size, src, a, b, allowed, r, 1))]
            for padded, plain in cases:
                got, want = op(*padded), op(*plain)
                for g, w in zip(got, want):
                    torch.testing.assert_close(g, w, equal_nan=True)
                assert 0 <= int(got[2].min()) and int(got[2].max()) < 9 - r
                if r == 4:  # every A token left: the NaN one was dropped, not averaged in
                    assert not got[0].isnan().any()
        print("ok")
    """)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=root,
                         env=env)
    assert res.returncode == 0 and "ok" in res.stdout, (res.returncode, res.stderr[-2000:])


def test_checkerboard_adjacency_traces_as_one_constant():
    """A compiled ToMato graph holds the grid's adjacency as one constant: written edge by edge it traced to hundreds
    of ops (242 on a 6 x 6 grid), which inductor turned into one huge kernel that took longer to generate than the
    rest of the model."""
    from torch.fx.experimental.proxy_tensor import make_fx
    gm = make_fx(lambda x: x & checkerboard((6, 6))[2])(torch.ones(18, 18, dtype=torch.bool))
    assert len([n for n in gm.graph.nodes if n.op == "call_function"]) <= 3, gm.code
    a_ids, b_ids, adj = checkerboard((3, 4))
    want = [[abs(a // 4 - b // 4) + abs(a % 4 - b % 4) == 1 for b in b_ids] for a in a_ids]
    assert adj.tolist() == want


def _close_calls(b, n, d, seed):
    """Tokens in a few tight clusters: many pairs within bf16's rounding of each other's similarity."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 4, d, generator=g)
    return centres[:, torch.randint(0, 4, (n,), generator=g)] + 0.03 * torch.randn(b, n, d, generator=g)


def _screened_cases(d):
    x = torch.randn(2, 1 + 14 * 14, 12)
    k = _close_calls(2, 1 + 14 * 14, d, seed=d)
    kn = k.clone()
    kn[:, 3] = float("nan")  # a partnerless A token
    grid = dict(grid=(14, 14))
    return [(fused.fused_global_merge, x, k, dict(r=40)), (fused.fused_global_merge, x, kn, dict(r=90)),
            (fused.fused_global_merge, x, k, dict(r=30, protect=20)),
            (fused.fused_nearest_merge, x, k, dict(r=40)), (fused.fused_nearest_merge, x, kn, dict(r=60, offset=1)),
            (fused.fused_window_merge, x, k, dict(r=6, windows=(3, 3), **grid)),  # windows padded with -1
            (fused.fused_adjacent_merge, x, k, dict(r=40, **grid))]


@pytest.mark.parametrize("d", [8, 64, 384, 1000])
def test_screened_similarity_finds_the_same_partners_bit_for_bit(d):
    """``screen``: a bf16 matmul only picks the candidate pairs and fp32 scores them again, so every merge method's
    kernel call gives the same tokens, sizes and source maps as without it, NaN rows and padding included, on
    tokens where a plain bf16 similarity would pick other partners."""
    require_fused_merge()
    for fn, x, k, kw in _screened_cases(d):
        plain = fn(x, k, None, None, prefix=1, **kw)
        screened = fn(x, k, None, None, prefix=1, screen=True, **kw)
        for p, s in zip(plain, screened):
            assert torch.equal(p, s) or torch.allclose(p, s, equal_nan=True, rtol=0, atol=0), fn.__name__
    # the tokens are close calls: rounded to bf16, the best B partner of some A token changes
    unit = torch.nn.functional.normalize(_close_calls(2, 1 + 14 * 14, d, seed=d)[:, 1:], dim=-1)
    a, b = unit[:, ::2], unit[:, 1::2]
    exact = (a @ b.transpose(1, 2)).argmax(-1)
    rounded = (a.bfloat16() @ b.bfloat16().transpose(1, 2)).float().argmax(-1)
    assert not torch.equal(exact, rounded)


def test_the_screen_is_chosen_by_measurement_per_width_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEPASS_DECISIONS_DIR", str(tmp_path))
    require_fused_merge()
    calls = []

    def timer(ms):
        return lambda fns: calls.append(sorted(fns)) or {n: ms[n] / 1e3 for n in fns}

    assert fused.choose_screen(64, timer=timer({"fp32": 1.0, "bf16": 0.5})).choice == "bf16"
    assert fused.choose_screen(384, timer=timer({"fp32": 0.5, "bf16": 1.0})).choice == "fp32"
    assert calls == [["bf16", "fp32"]] * 2
    again = fused.choose_screen(64, timer=timer({"fp32": 0.1, "bf16": 9.0}))  # kept: not timed again
    assert again.choice == "bf16" and again.reused and len(calls) == 2
    assert "merge similarity: bf16" in again.line()


def test_without_the_kernel_the_screen_is_a_default_not_a_measurement(monkeypatch):
    monkeypatch.setattr(fused, "kernel_error", lambda: "no compiler")
    d = fused.choose_screen(64, timer=lambda fns: pytest.fail("nothing can be timed"), keep=False)
    assert d.choice == "fp32" and not d.measured and "no compiler" in d.line()


@pytest.mark.parametrize("screen", [False, True])
def test_the_kernel_merges_the_same_on_one_thread_and_on_several(screen):
    """The kernel splits batches, windows and rows across threads, each with its own scratch buffers: on 1, 2 and 3
    threads every merge method gives the same tokens, sizes and source maps, bit for bit."""
    require_fused_merge()
    for fn, x, k, kw in _screened_cases(64):
        x, k = x.repeat(3, 1, 1), k.repeat(3, 1, 1)  # more batch rows than threads
        outs = []
        for n in (1, 2, 3):
            with threads(n):
                outs.append(fn(x, k, None, None, prefix=1, screen=screen, **kw))
        for out in outs[1:]:
            assert all(torch.allclose(p, q, equal_nan=True, rtol=0, atol=0) for p, q in zip(outs[0], out)), fn.__name__


def test_buffers_too_large_to_keep_give_the_same_merges():
    """Unit rows over 32 MiB are allocated per call instead of kept: the same partners, screened or not."""
    require_fused_merge()
    x, k = torch.randn(2, 1 + 2048, 4), _close_calls(2, 1 + 2048, 4200, seed=5)  # A rows: 2 x 1024 x 4200 floats
    plain = fused.fused_global_merge(x, k, None, None, r=300, prefix=1)
    screened = fused.fused_global_merge(x, k, None, None, r=300, prefix=1, screen=True)
    small = fused.fused_global_merge(x[:, :257], k[:, :257], None, None, r=40, prefix=1)  # kept buffers, then large
    again = fused.fused_global_merge(x, k, None, None, r=300, prefix=1)
    assert all(torch.equal(p, q) for p, q in zip(plain, screened))
    assert all(torch.equal(p, q) for p, q in zip(plain, again)) and small[0].shape[1] == 217


@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_class_attention_is_the_class_tokens_softmax_row_averaged_over_heads(mask):
    from mergepass.merge import class_attention, class_logits
    torch.manual_seed(6)
    q, k = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    m = {None: None, "float": torch.randn(2, 1, 1, 7), "bool": torch.rand(2, 3, 7, 7) > 0.3}[mask]
    if mask == "bool":
        m[..., 0] = True  # every row attends somewhere
    logits = q @ k.transpose(-2, -1) / 2.0  # 1/sqrt(4)
    if m is not None:
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m
    want = logits.softmax(-1)[:, :, 0].mean(1)
    x = torch.zeros(2, 7, 5)
    got = class_attention(class_logits(q, k, m), x)
    torch.testing.assert_close(got[..., 0], want)
    folded = class_attention(class_logits(q.reshape(6, 7, 4), k.reshape(6, 7, 4),
                                          None if m is None else m.expand(2, 3, -1, -1).reshape(6, -1, 7)), x)
    torch.testing.assert_close(folded, got)
