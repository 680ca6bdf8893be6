"""Independent, plainly written eager references of the merge methods, for timm ViTs.

Nothing here imports mergepass's merge code: token groups are Python lists, matching is done with
explicit loops, and the ViT forward is re-written from timm's modules. Only the *schedule* (which
block merges how much, and how) is shared with the code under test.
"""
from __future__ import annotations

import math

import torch


def _cos(u, v):
    u, v = u.detach(), v.detach()
    return float((u @ v) / (u.norm().clamp_min(1e-12) * v.norm().clamp_min(1e-12)))


def bipartite_lists(metric_rows, r, allowed=None, offset=0):
    """Plain ToMe matching on a list of token metrics (alternating A/B, A starting at ``offset``).

    Returns (unmerged A local ids ascending, {B local id: [A local ids merged into it]}).
    ``allowed(i, j)`` may forbid pairs (A position i, B position j)."""
    a = list(range(offset, len(metric_rows), 2))
    b = list(range(1 - offset, len(metric_rows), 2))
    best = {}
    for i in a:
        cands = [(j, _cos(metric_rows[i], metric_rows[j])) for j in b if allowed is None or allowed(i, j)]
        if not cands:
            best[i] = (None, float("-inf"))
            continue
        best[i] = max(cands, key=lambda t: t[1])
    order = sorted(a, key=lambda i: -best[i][1])
    src = set(order[:r])
    into = {j: [] for j in b}
    for i in src:
        into[best[i][0]].append(i)
    return [i for i in a if i not in src], into


def _combine(x, size, groups, ids):
    w = sum(size[i] for i in ids)
    v = sum(x[i] * size[i] for i in ids) / w
    return v, w, sorted(g for i in ids for g in groups[i])


def merge_tokens_global(x, metric, size, groups, prefix, r, offset=0, protect=0):
    """x [N, C], metric [N, D], size list[float], groups list[list[int]] -> merged lists.
    ``protect``: the tokens with the ``protect`` largest metric norms take no part in merging."""
    toks = list(range(prefix, x.shape[0]))
    norms = [float(metric[t].norm()) for t in toks]
    kept = set(sorted(range(len(toks)), key=lambda i: -norms[i])[:protect])
    unm, into = bipartite_lists([metric[t] for t in toks], r, offset=offset,
                                allowed=lambda i, j: i not in kept and j not in kept)
    return _assemble(x, size, groups, prefix, [[toks[i]] for i in unm] +
                     [[toks[j]] + [toks[i] for i in into[j]] for j in sorted(into)])


def _merge_into_best(x, size, groups, prefix, a, b, best, r):
    """The r A cells with the highest ``best[c] = (partner, score)`` join their partners; the rest stay."""
    order = sorted(a, key=lambda c: -best[c][1])
    src = set(order[:r])
    new_groups = [[prefix + c] for c in a if c not in src]
    for n in b:
        new_groups.append([prefix + n] + [prefix + c for c in a if c in src and best[c][0] == n])
    return _assemble(x, size, groups, prefix, new_groups)


def _assemble(x, size, groups, prefix, new_groups_local):
    out_x, out_s, out_g = [], [], []
    for t in range(prefix):
        out_x.append(x[t]); out_s.append(size[t]); out_g.append(groups[t])
    for ids in new_groups_local:
        v, w, g = _combine(x, size, groups, ids)
        out_x.append(v); out_s.append(w); out_g.append(g)
    return torch.stack(out_x), out_s, out_g



def merge_tokens_soft(x, metric, size, groups, prefix, r, k, tau, compare="tokens", offset=0, protect=0):
    """Soft many-to-many merging (Token Transforming): ToMe picks the ``r`` tokens that leave; each is
    shared among its ``k`` most similar kept tokens with weights softmax(cos / tau) over those ``k``,
    and each kept token becomes the size-weighted mean of itself and the shares it receives (one row of
    the transformation matrix W). Groups follow each leaving token's largest share."""
    feats = x if compare == "tokens" else metric
    toks = list(range(prefix, x.shape[0]))
    norms = [float(metric[t].norm()) for t in toks]
    guarded = set(sorted(range(len(toks)), key=lambda i: -norms[i])[:protect])
    unm, into = bipartite_lists([feats[t] for t in toks], r, offset=offset,
                                allowed=lambda i, j: i not in guarded and j not in guarded)
    kept = unm + sorted(into)                      # output order: unmerged A, then B
    leaving = [i for j in into for i in into[j]]
    num = {j: x[toks[j]] * size[toks[j]] for j in kept}
    den = {j: float(size[toks[j]]) for j in kept}
    members = {j: list(groups[toks[j]]) for j in kept}
    for s_ in leaving:
        cands = sorted(((j, _cos(feats[toks[s_]], feats[toks[j]])) for j in kept if j not in guarded),
                       key=lambda t: -t[1])[:k]
        e = [math.exp((c - cands[0][1]) / tau) for _, c in cands]
        for (j, _), w in zip(cands, e):
            share = size[toks[s_]] * w / sum(e)
            num[j] = num[j] + x[toks[s_]] * share
            den[j] += share
        members[cands[0][0]] += groups[toks[s_]]
    out_x = [x[t] for t in range(prefix)] + [num[j] / den[j] for j in kept]
    out_s = [size[t] for t in range(prefix)] + [den[j] for j in kept]
    out_g = [groups[t] for t in range(prefix)] + [sorted(members[j]) for j in kept]
    return torch.stack(out_x), out_s, out_g

def merge_tokens_windows(x, metric, size, groups, prefix, r, grid, windows):
    """LGTM: windows of equal token count re-formed from tracked locations (rows, then columns)."""
    gh, gw = grid
    nh, nw = windows
    toks = list(range(prefix, x.shape[0]))
    per = math.ceil(len(toks) / (nh * nw))

    def loc(t):
        ids = [g - prefix for g in groups[t]]
        return (sum(i // gw for i in ids) / len(ids), sum(i % gw for i in ids) / len(ids))

    pos = {t: loc(t) for t in toks}
    by_row = sorted(toks, key=lambda t: pos[t][0])
    band = nw * per
    wins = []
    for k in range(nh):
        chunk = sorted(by_row[k * band:(k + 1) * band], key=lambda t: pos[t][1])
        wins += [chunk[j * per:(j + 1) * per] for j in range(nw)]
    new_groups = []
    for win in wins:
        if not win:
            continue
        unm, into = bipartite_lists([metric[t] for t in win], r)
        new_groups += [[win[i]] for i in unm] + [[win[j]] + [win[i] for i in into[j]] for j in sorted(into)]
    return _assemble(x, size, groups, prefix, new_groups)


def merge_tokens_adjacent(x, metric, size, groups, prefix, r, grid):
    """ToMato, static budget, cosine option: checkerboard A/B, each A may join a 4-neighbour B by key
    cosine; best r merge. (The paper's similarity: :func:`merge_tokens_adjacent_paper`.)"""
    gh, gw = grid
    cells = list(range(gh * gw))
    a = [c for c in cells if (c // gw + c % gw) % 2 == 0]
    b = [c for c in cells if (c // gw + c % gw) % 2 == 1]
    best = {}
    for c in a:
        y, xx = divmod(c, gw)
        nbr = [(yy * gw + x2) for yy, x2 in ((y - 1, xx), (y + 1, xx), (y, xx - 1), (y, xx + 1))
               if 0 <= yy < gh and 0 <= x2 < gw]
        best[c] = max(((n, _cos(metric[prefix + c], metric[prefix + n])) for n in nbr), key=lambda t: t[1])
    return _merge_into_best(x, size, groups, prefix, a, b, best, r)


# -- ToMato as the paper defines it ---------------------------------------------------------------
# Kwon et al., "ToMato: Token Merging at Once" (2023), section 2.1: token similarity is "the attention
# distribution obtained by applying softmax to the attention score", compared between a token and its
# four neighbours (idx +-1, idx +-W), right after the first block's multi-head attention; a smaller
# threshold `sim` merges more. The authors' published code (Transformer04/ToMato, tome/merge.py) takes
# the post-attention tokens x (class token removed), attn = softmax(x @ x^T, dim=-1), and the visiting
# token `idx` absorbs neighbour `nbr` when attn[idx][nbr] >= sim: directed, row = the token that looks.

def tomato_log_attn(tokens):
    """log of the paper's ``attn`` for patch tokens ``tokens`` [M, C]: row i is log softmax_j(x_i . x_j)
    over all M tokens, computed with Python floats in double precision. A list of M lists."""
    t = [row.detach().double() for row in tokens]
    out = []
    for ti in t:
        s = [float(ti @ tj) for tj in t]
        top = max(s)
        log_z = top + math.log(sum(math.exp(v - top) for v in s))
        out.append([v - log_z for v in s])
    return out


def _grid_neighbours(c, grid):
    """idx-1, idx+1, idx-W, idx+W as in the authors' code, kept on the grid."""
    gh, gw = grid
    y, x = divmod(c, gw)
    return [yy * gw + xx for yy, xx in ((y, x - 1), (y, x + 1), (y - 1, x), (y + 1, x)) if 0 <= yy < gh and 0 <= xx < gw]


def tomato_flood_fill_paper(tokens, grid, sim):
    """Algorithms 1-2 with the paper's similarity: for i = 0..M-1 not yet visited, visit_recursive
    from i (mark it, and recurse into each 4-neighbour with attn[idx][nbr] >= sim); each visit from
    Algorithm 1 merges into one token. Returns the groups (sorted lists of cells), sorted."""
    attn = [[math.exp(v) for v in row] for row in tomato_log_attn(tokens)]
    visited = set()

    def visit_recursive(idx, group):
        if idx in visited:
            return
        visited.add(idx)
        group.append(idx)
        for nbr in _grid_neighbours(idx, grid):
            if attn[idx][nbr] >= sim:
                visit_recursive(nbr, group)

    groups = []
    for i in range(grid[0] * grid[1]):
        if i not in visited:
            group = []
            visit_recursive(i, group)
            groups.append(sorted(group))
    return sorted(groups)


def merge_tokens_adjacent_paper(x, size, groups, prefix, r, grid):
    """ToMato within static shapes, with the paper's similarity: the patch tokens are split like a
    checkerboard (A: (row + col) even); each A token's candidate is the 4-neighbour its own attention
    row scores highest (the authors' attn[idx][nbr], idx the A token), and the ``r`` A tokens with the
    highest such scores join their candidate (size-weighted mean). x [N, C] are the post-attention
    tokens, which are also the similarity's input."""
    gh, gw = grid
    cells = list(range(gh * gw))
    log_attn = tomato_log_attn(x[prefix:])
    a = [c for c in cells if (c // gw + c % gw) % 2 == 0]
    b = [c for c in cells if (c // gw + c % gw) % 2 == 1]
    best = {}
    for c in a:
        cands = sorted(_grid_neighbours(c, grid))  # ties: the first B token, as an argmax over B ids
        best[c] = max(((n, log_attn[c][n]) for n in cands), key=lambda t: t[1])
    return _merge_into_best(x, size, groups, prefix, a, b, best, r)


def _full(xb, groups, n0):
    """Unmerge: every original token takes the value of the token that holds it."""
    full = torch.empty(n0, xb.shape[-1], dtype=xb.dtype)
    for j, g in enumerate(groups):
        for i in g:
            full[i] = xb[j]
    return full


def reference_forward(model, images, schedule, prop_attn=True, features=False, extra=None, hidden=False):
    """Eager forward of a timm / torchvision / Hugging Face ViT with merges applied per ``schedule``
    (a mergepass Schedule): attention written out, merges done with the plain list code above.
    A merged token sits at the position of the first original token it holds (rotary and relative
    position tables are read there).
    ``extra``: {kind: fn(x, metric, size, groups, prefix, plan) -> (x, size, groups)} for other merge kinds.
    ``hidden``: also return the unmerged token map entering the first block and leaving every block."""
    fam = _family(model)
    x = fam.embed(images)
    bsz, n0, _ = x.shape
    prefix = schedule.prefix
    outs, hiddens = [], []
    for b in range(bsz):
        xb = x[b]
        size = [1.0] * n0
        groups = [[i] for i in range(n0)]
        maps = [xb]
        for blk, plan in zip(fam.blocks, schedule.blocks):
            pos = [min(g) for g in groups]
            xb, k = fam.attention_residual(blk, xb, size if prop_attn else None, pos)
            if plan.merged:
                metric = k.mean(0)  # mean over heads -> [N, D]
                if plan.kind == "global":
                    xb, size, groups = merge_tokens_global(xb, metric, size, groups, prefix, plan.r,
                                                           plan.args.get("offset", 0), plan.args.get("protect", 0))
                elif plan.kind == "local":
                    xb, size, groups = merge_tokens_windows(xb, metric, size, groups, prefix, plan.r,
                                                            schedule.grid, plan.args["windows"])
                elif plan.kind == "adjacent" and plan.args.get("similarity", "cosine") == "softmax":
                    xb, size, groups = merge_tokens_adjacent_paper(xb, size, groups, prefix, plan.r, schedule.grid)
                elif plan.kind == "adjacent":
                    xb, size, groups = merge_tokens_adjacent(xb, metric, size, groups, prefix, plan.r, schedule.grid)
                elif extra and plan.kind in extra:
                    xb, size, groups = extra[plan.kind](xb, metric, size, groups, prefix, plan)
                else:
                    raise AssertionError(plan.kind)
            xb = fam.mlp_residual(blk, xb)
            maps.append(_full(xb, groups, n0))
        for blk in fam.blocks[len(schedule.blocks):]:  # blocks after the matched chain run unmerged
            xb = maps[-1]
            xb = fam.mlp_residual(blk, fam.attention_residual(blk, xb, None, list(range(n0)))[0])
            maps.append(xb)
        outs.append(maps[-1])
        hiddens.append(maps)
    out = fam.finish(torch.stack(outs), features)
    if not hidden:
        return out
    return out, [torch.stack([h[i] for h in hiddens]) for i in range(len(hiddens[0]))]


def _attend(q, k, v, size):
    """q, k, v [H, N, D] -> [N, H*D], with log(size) added to the logits when given."""
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + torch.tensor(size, dtype=q.dtype).log()[None, None, :]
    out = logits.softmax(-1) @ v
    return out.transpose(0, 1).reshape(q.shape[1], -1)


class _Timm:
    def __init__(self, m):
        self.m, self.blocks = m, list(m.blocks)

    def embed(self, images):
        m = self.m
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))

    def attention_residual(self, blk, x, size, pos):
        attn = blk.attn
        n, c = x.shape
        h = attn.num_heads
        qkv = attn.qkv(blk.norm1(x[None]))[0].reshape(n, 3, h, c // h).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = _attend(q * attn.scale * q.shape[-1] ** 0.5, k, v, size)
        out = attn.proj(attn.norm(out[None]) if hasattr(attn, "norm") else out[None])[0]
        return x + blk.ls1(out[None])[0], k

    def mlp_residual(self, blk, x):
        return x + blk.ls2(blk.mlp(blk.norm2(x[None])))[0]

    def finish(self, x, features):
        x = self.m.norm(x)
        return x if features else self.m.forward_head(x)


class _TorchVision:
    def __init__(self, m):
        self.m, self.blocks = m, list(m.encoder.layers)

    def embed(self, images):
        m = self.m
        x = m._process_input(images)
        x = torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + m.encoder.pos_embedding

    def attention_residual(self, blk, x, size, pos):
        sa = blk.self_attention
        n, c = x.shape
        h = sa.num_heads
        qkv = torch.nn.functional.linear(blk.ln_1(x), sa.in_proj_weight, sa.in_proj_bias)
        q, k, v = qkv.reshape(n, 3, h, c // h).permute(1, 2, 0, 3)
        out = sa.out_proj(_attend(q, k, v, size))
        return x + out, k

    def mlp_residual(self, blk, x):
        return x + blk.mlp(blk.ln_2(x))

    def finish(self, x, features):
        x = self.m.encoder.ln(x)
        return x if features else self.m.heads(x[:, 0])


class _HF:
    """transformers 5.x ViT layout (vit.layers[i].attention.{q,k,v,o}_proj, mlp.fc1/fc2)."""

    def __init__(self, m):
        self.m = m
        self.vit = m.vit if hasattr(m, "vit") else m
        self.blocks = list(self.vit.layers)
        self.heads = self.vit.config.num_attention_heads

    def embed(self, images):
        return self.vit.embeddings(images)

    def attention_residual(self, blk, x, size, pos):
        a = blk.attention
        n, c = x.shape
        h = self.heads
        y = blk.layernorm_before(x)
        q, k, v = (lin(y).reshape(n, h, c // h).transpose(0, 1) for lin in (a.q_proj, a.k_proj, a.v_proj))
        return x + a.o_proj(_attend(q, k, v, size)), k

    def mlp_residual(self, blk, x):
        return x + blk.mlp(blk.layernorm_after(x))

    def finish(self, x, features):
        x = self.vit.layernorm(x)
        if features or not hasattr(self.m, "classifier"):
            return x
        return self.m.classifier(x[:, 0])


def _family(model):
    for mod in ("reference_timm", "reference_hf"):  # model-specific layouts, tried first
        try:
            families = __import__(mod).FAMILIES
        except ImportError:
            continue
        for fam in families:
            if fam.accepts(model):
                return fam(model)
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        return _Timm(model)
    if hasattr(model, "encoder") and hasattr(model, "conv_proj"):
        return _TorchVision(model)
    return _HF(model)


def tomato_flood_fill(metric, grid, threshold):
    """ToMato's Algorithms 1-2 with the cosine option: visit tokens in order, recursively absorb
    4-neighbours whose key cosine to the visited token passes ``threshold``; each visit forms one group.
    (The paper's similarity: :func:`tomato_flood_fill_paper`.)"""
    gh, gw = grid
    visited = set()
    groups = []

    def visit(idx, group):
        if idx in visited:
            return
        visited.add(idx)
        group.append(idx)
        y, x = divmod(idx, gw)
        for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= yy < gh and 0 <= xx < gw:
                nb = yy * gw + xx
                if nb not in visited and _cos(metric[idx], metric[nb]) >= threshold:
                    visit(nb, group)

    for i in range(gh * gw):
        if i not in visited:
            group = []
            visit(i, group)
            groups.append(sorted(group))
    return sorted(groups)


def tome_official_merge(x, metric, size, r, class_token=True, distill_token=False):
    """A plain transcription of facebookresearch/ToMe's ``bipartite_soft_matching`` + ``merge_wavg``
    (tome/merge.py): A/B alternate over *sequence* positions, the class token sits in A and is
    protected by a -inf score row. x [B, N, C], metric [B, N, D], size [B, N, 1]."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(t, mode):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size


def tome_parse_r(num_layers, r):
    """Official ToMe's per-layer r (``tome/utils.py: parse_r``): an int, a list padded with zeros, or an
    ``(r, inflect)`` tuple whose schedule runs linearly from ``int(r * (1 - inflect))`` to ``2r`` minus that."""
    inflect = 0
    if isinstance(r, list):
        return r + [0] * (num_layers - len(r)) if len(r) < num_layers else list(r)
    if isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]
