"""benchmarks/token_policies.py: its block-by-block forward against timm's and mergepass's, and its steps' invariants."""
import copy

import pytest
import torch

from helpers import benchmark

tp = benchmark("token_policies")

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=70, depth=3,
                             num_classes=0).eval()


def _images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 70, 70)


def test_dense_policy_is_the_model(model):
    x = _images()
    with torch.no_grad():
        ours = tp.cls_features(model, x, tp.parse("dense:0*3", 3))
        ref = model.forward_features(x)[:, 0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_pruning_in_the_last_block_leaves_the_class_token_alone(model):
    x = _images()
    with torch.no_grad():
        a = tp.cls_features(model, x, tp.parse("tome:2*2,dense:0*1", 3))
        b = tp.cls_features(model, x, tp.parse("tome:2*2,prune:6*1", 3))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_tome_policy_matches_the_tome_recipe(model):
    from mergepass.eval.evaluate import Features, compile_spec
    x = _images()
    torch._dynamo.reset()
    fn, _ = compile_spec(Features(model).eval(), "tome:merge.r=4,lower.target=eager", [x])
    with torch.no_grad():
        ref = fn(x)[:, 0]
        ours = tp.cls_features(model, x, tp.parse("tome:4*3", 3))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_protected_tokens_neither_leave_nor_absorb():
    torch.manual_seed(2)
    b, n, c, r = 2, 17, 8, 5
    x, keys = torch.randn(b, n, c), torch.randn(b, n, c)
    size = torch.ones(b, n, 1)
    protect = torch.zeros(b, n - 1, dtype=torch.bool)
    protect[:, [0, 3, 8]] = True
    out, s = tp.tome_protected(x, keys, size, r, protect)
    assert out.shape == (b, n - r, c) and torch.allclose(s.sum(1), size.sum(1))
    for i in range(b):  # each protected token is still there, alone and unchanged
        for j in (0, 3, 8):
            hit = (out[i] - x[i, 1 + j]).abs().amax(-1) < 1e-6
            assert hit.sum() == 1 and s[i, hit.nonzero()[0, 0], 0] == 1


def test_soft_protection_and_bias_keep_sizes_and_counts():
    torch.manual_seed(3)
    b, n, c, r = 2, 17, 8, 5
    x = torch.randn(b, n, c)
    size = torch.ones(b, n, 1)
    out, s = tp.soft_k1(x, size, r, bias_a=torch.rand(b, n - 1))
    assert out.shape == (b, n - r, c) and torch.allclose(s.sum(1), size.sum(1))
    out, s = tp.soft_k1(x, size, r, bias_a=torch.zeros(b, n - 1))
    ref, s_ref, _ = tp.soft_merge(x, x, size, None, r=r, prefix=1, k=1, compare="tokens")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(s, s_ref)


def test_protection_by_norm_keeps_the_largest_tokens_and_leaves_the_class_attention_to_the_rest():
    torch.manual_seed(5)
    b, n, c, h, r = 2, 17, 8, 2, 5
    x, keys = torch.randn(b, n, c), torch.randn(b, h, n, c)
    x[:, [3, 9]] *= 10  # the two largest patch tokens
    probs = torch.rand(b, h, n, n).softmax(-1)
    size = torch.ones(b, n, 1)
    for op in ("tome", "soft"):
        out, s = tp.reduce(op, r, {"protect": "2", "by": "norm"}, x, keys, probs, size)[:2]
        for i in range(b):  # each still there, alone and unchanged
            for j in (3, 9):
                hit = (out[i] - x[i, j]).abs().amax(-1) < 1e-6
                assert hit.sum() == 1 and s[i, hit.nonzero()[0, 0], 0] == 1
    # without protection the option changes nothing: the class attention still weighs the means
    opts = {"beta": "1"}
    torch.testing.assert_close(tp.reduce("soft", r, {**opts, "by": "norm"}, x, keys, probs, size)[0],
                               tp.reduce("soft", r, opts, x, keys, probs, size)[0])


def test_weighted_soft_means_keep_sizes_and_unit_weights_are_soft():
    torch.manual_seed(4)
    b, n, c, r = 2, 17, 8, 5
    x, size = torch.randn(b, n, c), torch.rand(b, n, 1) + 0.5
    out, s = tp.soft_k1(x, size, r, weight=torch.rand(b, n - 1) + 0.1)
    assert out.shape == (b, n - r, c) and torch.allclose(s.sum(1), size.sum(1))
    ref, s_ref, _ = tp.soft_merge(x, x, size, None, r=r, prefix=1, k=1, compare="tokens")
    assert not torch.allclose(out, ref)  # the weights move the means
    out, s = tp.soft_k1(x, size, r, weight=torch.ones(b, n - 1))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(s, s_ref)


def test_parse_and_macs(model):
    steps = tp.parse("prune:2*1,soft+protect=3:2*2", 3)
    assert steps[0] == ("prune", 2, {}) and steps[2] == ("soft", 2, {"protect": "3"})
    with pytest.raises(ValueError, match="covers 2 blocks"):
        tp.parse("tome:2*2", 3)
    tokens = model.patch_embed.num_patches + 1
    assert tp.macs_ratio(model, tp.parse("dense:0*3", 3), tokens) == 1.0
    assert tp.macs_ratio(model, tp.parse("prune:2*3", 3), tokens) == tp.macs_ratio(model, tp.parse("tome:2*3", 3), tokens)


def test_residual_unmerge_with_nothing_merged_is_the_model(model):
    x = _images()
    with torch.no_grad():
        ref = model.forward_features(x)[:, 0]
        for policy in ("um:0*3", "umlp:0*3", "um+grid=1:0*1,umlp+metric=n:0*2"):
            torch.testing.assert_close(tp.cls_features(model, x, tp.parse(policy, 3)), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r,grid,cap", [(5, False, 0), (8, False, 0), (12, False, 0), (12, False, 3), (11, True, 0)])
def test_assignment_groups_cover_the_tokens(r, grid, cap):
    torch.manual_seed(4)
    metric = torch.randn(3, 16, 8)  # a 4x4 patch grid
    group = tp.assignment(metric, r, grid=grid, index=1, cap=cap)
    m = 16 - r
    assert group.shape == (3, 16) and group.min() >= 0 and group.max() == m - 1
    for g in group:  # every group holds a token, and the sizes sum to the token count
        counts = torch.bincount(g, minlength=m)
        assert (counts > 0).all() and counts.sum() == 16
    xm, size = tp.group_mean(metric, torch.ones(3, 16, 1), group, m)
    assert torch.allclose(size.sum(1), torch.full((3, 1), 16.0))
    torch.testing.assert_close((xm * size).sum(1), metric.sum(1), atol=1e-5, rtol=1e-5)
    assert sum(a * b for a, b in tp.rounds(16, r, grid, cap)) > 0 and len(tp.rounds(16, r, grid, cap)) >= (2 if cap else 1)


def test_residual_unmerge_of_duplicate_tokens_is_exact(model):
    # patch tokens in identical pairs (A token 2j equals B token 2j + 1): merging the pairs, computing the
    # block with proportional attention and unmerging its update is the dense block
    torch.manual_seed(5)
    half = torch.randn(2, 6, model.embed_dim)
    x = torch.cat([torch.randn(2, 1, model.embed_dim), half.repeat_interleave(2, dim=1)], 1)
    size = torch.ones(2, 13, 1)
    blk = copy.deepcopy(model.blocks[0])
    for ls in (blk.ls1, blk.ls2):  # the random model's layer scales are tiny: make the block's update count
        ls.gamma.data.fill_(1.0)
    with torch.no_grad():
        ref = tp.run_block(blk, x, size, ("dense", 0, {}))[0]
        for op in ("um", "umlp"):
            out, s = tp.run_block(blk, x, size, (op, 6, {"metric": "x"}))
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            assert out.shape == x.shape and torch.equal(s, size)
        # merging tokens that differ changes the result
        assert (tp.run_block(blk, x, size, ("um", 8, {"metric": "x"}))[0] - ref).abs().max() > 1e-2


def test_zero_correction_is_a_no_op_and_calibration_closes_the_mean_gap(model):
    torch.manual_seed(6)
    imgs = torch.randn(4, 3, 70, 70)
    steps = tp.parse("tome:4*3", 3)
    with torch.no_grad():
        plain = tp.cls_features(model, imgs, steps)
        zero = [torch.zeros(model.embed_dim)] * 3
        torch.testing.assert_close(tp.cls_features(model, imgs, steps, zero), plain)
        torch.testing.assert_close(tp.cls_features(model, imgs, steps, [None] * 3), plain)
        batches = [imgs[:2], imgs[2:]]
        corr = tp.calibrate(model, batches, steps)
        assert len(corr) == 3 and corr[-1].shape == (model.embed_dim,) and corr[-1].abs().max() > 0
        # after the last block (before the final norm) the corrected class token's mean equals the dense one's
        def last_cls(st, c):
            x, size = tp.embed(model, imgs)
            for i, (blk, step) in enumerate(zip(model.blocks, st)):
                x, size = tp.run_block(blk, x, size, step, i)
                x = tp.correct(x, None if c is None else c[i])
            return x[:, 0]
        torch.testing.assert_close(last_cls(steps, corr).mean(0), last_cls(tp.parse("dense:0*3", 3), None).mean(0),
                                   atol=1e-5, rtol=1e-5)
        both = tp.calibrate(model, batches, steps, scope="all")
        assert both[0].shape == (2, model.embed_dim)
        torch.testing.assert_close(both[0][0], corr[0])


def test_corrections_from_images_a_apply_unchanged_to_images_b(model):
    torch.manual_seed(7)
    a = [torch.randn(2, 3, 70, 70) for _ in range(2)]
    b = [torch.randn(2, 3, 70, 70) for _ in range(4)]
    steps = tp.parse("um:4*1,tome:4*2", 3)
    with torch.no_grad():
        from_a = tp.calibrate(model, a, steps)
        held = tp.corrections_for(model, a, b, steps)
        assert len(held) == 4
        for c in held:
            for x, y in zip(c, from_a):
                assert torch.equal(x, y)
        from_b = tp.calibrate(model, b, steps)
        assert not torch.allclose(from_a[-1], from_b[-1])
        folds = tp.corrections_for(model, a, b, steps, folds=True)  # each half calibrated on the other
        for x, y in zip(folds[0], tp.calibrate(model, b[2:], steps)):
            torch.testing.assert_close(x, y)
        for x, y in zip(folds[3], tp.calibrate(model, b[:2], steps)):
            torch.testing.assert_close(x, y)


def test_unmerge_macs(model):
    tokens = model.patch_embed.num_patches + 1
    dense = tp.macs_ratio(model, tp.parse("dense:0*3", 3), tokens)
    assert tp.macs_ratio(model, tp.parse("um:0*3", 3), tokens) == dense  # nothing merged, nothing matched
    assert tp.macs_ratio(model, tp.parse("um:8*3", 3), tokens) < tp.macs_ratio(model, tp.parse("umlp:8*3", 3), tokens) < dense
    assert (tp.macs_ratio(model, tp.parse("um+cap=2:8*3", 3), tokens)
            > tp.macs_ratio(model, tp.parse("um:8*3", 3), tokens))


def test_linear_corrections_follow_the_source_map(model):
    torch.manual_seed(8)
    batches = [torch.randn(2, 3, 70, 70) for _ in range(2)]
    c = model.embed_dim
    with torch.no_grad():
        # nothing reduced: the dense tokens are the reduced ones, the fitted corrections vanish
        for scope, shape in (("lin0.01", (c + 2, c)), ("diag0.01", (3, c))):
            corr = tp.calibrate(model, batches, tp.parse("dense:0*3", 3), scope)
            assert corr[0].shape == shape
            assert max(w.abs().max().item() for w in corr) < 1e-4
        x = torch.randn(2, 9, c)
        torch.testing.assert_close(tp.correct(x, torch.zeros(c + 2, c)), x)
        torch.testing.assert_close(tp.correct(x, torch.zeros(3, c)), x)
        # tome's source map: every original token is held by one reduced token
        xs, size = tp.embed(model, batches[0])
        src = None
        for i, blk in enumerate(model.blocks):
            xs, size, src = tp.traced_block(blk, xs, size, ("tome", 4, {}), i, src)
        assert src.shape == (2, 26) and src.max() == xs.shape[1] - 1
        for b in range(2):
            torch.testing.assert_close(torch.bincount(src[b], minlength=xs.shape[1]).float(), size[b, :, 0])
        corr = tp.calibrate(model, batches, tp.parse("tome:4*3", 3), "lin0.01")
        assert corr[-1].abs().max() > 0


def test_class_only_last_block_is_exact_for_the_class_token(model):
    x = _images()
    with torch.no_grad():
        for head in ("dense:0*2", "tome:3*2", "soft:2*1,um:4*1"):
            a = tp.cls_features(model, x, tp.parse(head + ",dense:0*1", 3))
            b = tp.cls_features(model, x, tp.parse(head + ",clsonly:0*1", 3))
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    tokens = model.patch_embed.num_patches + 1
    assert (tp.macs_ratio(model, tp.parse("tome:3*2,clsonly:0*1", 3), tokens)
            < tp.macs_ratio(model, tp.parse("tome:3*2,prune:20*1", 3), tokens))


def test_soft_compares_by_keys_only_when_asked():
    from mergepass.methods.soft import soft_merge
    g = torch.Generator().manual_seed(2)
    x, keys = torch.randn(2, 17, 12, generator=g), torch.randn(2, 3, 17, 4, generator=g)
    probs, size = torch.rand(2, 3, 17, 17, generator=g), torch.ones(2, 17, 1)
    for compare in ("tokens", "keys"):
        opts = {"compare": compare} if compare == "keys" else {}
        got = tp.reduce("soft", 4, opts, x, keys, probs, size)
        want = soft_merge(x, keys.mean(1), size, None, r=4, prefix=tp.PREFIX, k=1, compare=compare)
        assert all(torch.equal(a, b) for a, b in zip(got[:2], want[:2])), compare
    assert not torch.equal(tp.reduce("soft", 4, {"compare": "keys"}, x, keys, probs, size)[0],
                           tp.reduce("soft", 4, {}, x, keys, probs, size)[0])


def _agglomerate_plainly(x, r):
    """Greedy average-linkage clustering of one image's patch tokens, written out: r times, merge the two clusters
    whose members' cosines average highest; each cluster becomes its members' mean, placed at its first member."""
    feats = torch.nn.functional.normalize(x, dim=-1)
    cos = feats @ feats.T
    clusters = [[i] for i in range(x.shape[0])]
    for _ in range(r):
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                s = cos[clusters[a]][:, clusters[b]].mean().item()
                if best is None or s > best[0]:
                    best = (s, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    clusters.sort(key=min)
    return torch.stack([x[c].mean(0) for c in clusters]), [len(c) for c in clusters]


def test_agglomerative_merging_matches_a_plain_average_linkage_clustering():
    torch.manual_seed(4)
    x = torch.randn(2, 1 + 16, 8)
    y, size = tp.agglomerate(x, torch.ones(2, 17, 1), 6)
    assert y.shape == (2, 11, 8) and torch.equal(y[:, 0], x[:, 0])
    for b in range(2):
        want, sizes = _agglomerate_plainly(x[b, 1:], 6)
        torch.testing.assert_close(y[b, 1:], want)
        assert size[b, 1:, 0].tolist() == sizes
    prot = torch.zeros(2, 16, dtype=torch.bool)
    prot[:, :4] = True
    y, size = tp.agglomerate(x, torch.ones(2, 17, 1), 6, protect=prot)
    assert torch.equal(y[:, 1:5], x[:, 1:5]) and torch.all(size[:, 1:5] == 1) and torch.all(size.sum(1) == 17)


def _soft_cost_plainly(x, size, r, cost):
    """One image's soft merge by a pair cost, written out: every even patch token (A) finds its cheapest odd one
    (B); the r A tokens with the cheapest partners leave, each into its cheapest kept token; kept tokens become
    size-weighted means. Returns (tokens, sizes) in soft's order: the A tokens left, then the B tokens."""
    feats, n = x[1:], size[1:, 0]

    def c(i, j):
        if cost == "ward":
            return (n[i] * n[j] / (n[i] + n[j]) * (feats[i] - feats[j]).square().sum()).item()
        return 1 - torch.nn.functional.cosine_similarity(feats[i], feats[j], dim=0).item()

    a, b = list(range(0, len(feats), 2)), list(range(1, len(feats), 2))
    best = {i: min(c(i, j) for j in b) for i in a}
    leave = sorted(a, key=lambda i: best[i])[:r]
    kept = [i for i in a if i not in leave] + b
    groups = {j: [j] for j in kept}
    for s in leave:
        groups[min(kept, key=lambda j: c(s, j))].append(s)
    tok = [x[0]] + [sum(feats[i] * n[i] for i in groups[j]) / sum(n[i] for i in groups[j]) for j in kept]
    return torch.stack(tok), [1.0] + [sum(n[i] for i in groups[j]).item() for j in kept]


@pytest.mark.parametrize("cost", ["cos", "ward"])
def test_soft_cost_matches_a_plain_merge_and_cosine_is_soft_merge(cost):
    from mergepass.methods.soft import soft_merge
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1 + 14, 6, generator=g)
    size = torch.randint(1, 4, (2, 15, 1), generator=g).float()
    y, s = tp.soft_cost(x, size, 4, x[:, 1:], cost)
    for i in range(2):
        want, sizes = _soft_cost_plainly(x[i], size[i], 4, cost)
        torch.testing.assert_close(y[i], want)
        assert s[i, :, 0].tolist() == sizes
    if cost == "cos":  # soft merging's own choice
        ref = soft_merge(x, x, size, None, r=4, prefix=tp.PREFIX, k=1, compare="tokens")
        torch.testing.assert_close(y, ref[0]) and torch.testing.assert_close(s, ref[1])
    with pytest.raises(ValueError, match=r"\+cost="):
        tp.reduce("soft", 4, {"cost": "l2"}, x, torch.randn(2, 3, 15, 4), torch.rand(2, 3, 15, 15), size)


def test_greedy_pairs_never_lets_a_partner_leave():
    g = torch.Generator().manual_seed(6)
    cost = torch.rand(3, 12, 12, generator=g)
    cost = cost + cost.transpose(1, 2)
    kept, leave = tp.greedy_pairs(cost, 5)
    for b in range(3):
        c = cost[b].clone().fill_diagonal_(float("inf"))
        part = c.argmin(1)
        out, held = [], set()
        for i in c.min(1).values.argsort().tolist():  # written out: cheapest first, partners stay
            if len(out) < 5 and i not in held and int(part[i]) not in out:
                out.append(i)
                held.add(int(part[i]))
        assert sorted(out) == sorted(leave[b].tolist())
        assert not set(part[leave[b]].tolist()) & set(leave[b].tolist())
        assert sorted(kept[b].tolist() + leave[b].tolist()) == list(range(12))


def test_detail_reinjection_rebuilds_each_token_and_at_zero_is_the_class_only_block(model):
    g = torch.Generator().manual_seed(7)
    x, x0 = torch.randn(2, 4, 3, generator=g), torch.randn(2, 9, 3, generator=g)
    source = torch.tensor([[0, 1, 1, 2, 3, 3, 3, 2, 1], [0, 3, 2, 1, 1, 1, 2, 3, 3]])
    got = tp.reinject(x, x0, source, 0.5)
    for b in range(2):
        for i in range(9):
            group = [j for j in range(9) if source[b, j] == source[b, i]]
            want = x[b, source[b, i]] + 0.5 * (x0[b, i] - x0[b, group].mean(0))
            torch.testing.assert_close(got[b, i], want)
    img = _images()
    with torch.no_grad():
        a = tp.cls_features(model, img, tp.parse("dense:0*1,soft:3*1,clsonly:0*1", 3))
        b = tp.cls_features(model, img, tp.parse("dense:0*1,soft:3*1,clsonly+detail=0:0*1", 3))
        d = tp.cls_features(model, img, tp.parse("dense:0*2,clsonly+detail=1:0*1", 3))
        e = tp.cls_features(model, img, tp.parse("dense:0*2,clsonly:0*1", 3))
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d, e, atol=1e-5, rtol=1e-5)  # nothing merged: nothing to reinject


def test_protection_yields_to_r_as_the_pipeline_does():
    g = torch.Generator().manual_seed(8)
    x, keys = torch.randn(2, 17, 12, generator=g), torch.randn(2, 3, 17, 4, generator=g)
    probs, size = torch.rand(2, 3, 17, 17, generator=g), torch.ones(2, 17, 1)
    got = tp.reduce("soft", 6, {"protect": "48", "yield": "1"}, x, keys, probs, size)
    want = tp.reduce("soft", 6, {"protect": "2"}, x, keys, probs, size)  # 16 patch tokens: 16 // 2 - 6 = 2
    assert all(torch.equal(a, b) for a, b in zip(got[:2], want[:2]))
    assert not torch.equal(got[0], tp.reduce("soft", 6, {}, x, keys, probs, size)[0])
    with pytest.raises(RuntimeError):  # 48 of 16 tokens cannot be protected without yielding
        tp.reduce("soft", 6, {"protect": "48"}, x, keys, probs, size)


def test_accumulated_class_attention_at_zero_decay_is_this_blocks(model):
    model_ = copy.deepcopy(model)  # its layer scales raised so that the blocks' updates (and their choices) matter
    with torch.no_grad():
        for blk in model_.blocks:
            blk.ls1.gamma.fill_(1.0)
            blk.ls2.gamma.fill_(1.0)
    x = _images()
    with torch.no_grad():
        now = tp.cls_features(model_, x, tp.parse("dense:0*1,soft+protect=4:3*2", 3))
        acc0 = tp.cls_features(model_, x, tp.parse("dense:0*1,soft+protect=4+acc=0:3*2", 3))
        acc1 = tp.cls_features(model_, x, tp.parse("dense:0*1,soft+protect=4+acc=1:3*2", 3))
    torch.testing.assert_close(acc0, now, atol=1e-5, rtol=1e-5)
    assert not torch.equal(acc1, acc0)
    with pytest.raises(ValueError, match=r"\+acc: dense, tome, soft"):
        tp.cls_features(model_, x, tp.parse("dense:0*1,prune:3*1,soft+protect=4+acc=1:3*1", 3))


def test_position_order_sorts_by_the_first_token_held_and_keeps_what_each_original_reads(model):
    """``+order=pos``: the patch tokens come out sorted by the first original token each holds, the class token first,
    and every original token still reads the same merged token; with nothing merged the order is the identity."""
    torch.manual_seed(3)
    x, size = torch.randn(2, 5, 4), torch.tensor([1.0, 2, 1, 3, 1])[None, :, None].expand(2, -1, -1)
    source = torch.tensor([[0, 3, 2, 3, 1, 4, 1, 3], [0, 1, 1, 2, 3, 4, 3, 2]])  # original -> merged token
    xo, so, src = tp.in_position_order(x, size, source)
    first = [[min(i for i, s in enumerate(row) if s == t) for t in range(5)] for row in src.tolist()]
    assert all(f == sorted(f) for f in first)
    torch.testing.assert_close(tp.unmerge(xo, src), tp.unmerge(x, source))
    torch.testing.assert_close(so.sum(1), size.sum(1))
    ident = torch.arange(5).expand(2, -1)
    same = tp.in_position_order(x, size, ident)
    assert torch.equal(same[0], x) and torch.equal(same[2], ident)
    # attention and MLP do not read the order: sorting after the last merge leaves the class token as it was
    img = _images()
    with torch.no_grad():
        a = tp.cls_features(model, img, tp.parse("dense:0*1,soft:4*1,soft+order=pos:4*1", 3))
        b = tp.cls_features(model, img, tp.parse("dense:0*1,soft:4*1,soft:4*1", 3))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
