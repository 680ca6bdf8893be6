"""Random ViT architectures x random recipes: merged and equal to the eager reference, or declined with
a warning and equal to the plain model; never a crash. ``python tests/fuzz_vits.py --cases 200`` is
the long run."""
import os
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_vits import Arch, check, expected_outcome, random_case

CASES = int(os.environ.get("MERGEPASS_FUZZ_CASES", "12"))


def _constructs(arch: Arch) -> set:
    return {arch.position} | ({"registers"} if arch.reg else set()) | (set() if arch.cls else {"no class token"})


def test_random_vits_and_recipes_mostly_merge():
    outcomes, merged = Counter(), Counter()
    for seed in range(CASES):
        arch, method, over = random_case(seed)
        out = check(arch, method, over, seed)
        assert out == expected_outcome(arch, method, over), (seed, out, arch, method, over)
        outcomes[out] += 1
        if out == "merged":
            merged.update(_constructs(arch))
    # these seeds are all mergeable ViTs; a pass that declined everything would still "pass" the
    # per-case checks, so how many really merge, and with which constructs, is part of the property
    assert outcomes["merged"] >= CASES // 2, outcomes
    assert all(merged[c] for c in ("rope", "relpos", "registers", "no class token")), merged


@st.composite
def archs(draw):
    position = draw(st.sampled_from(["absolute", "rope", "relpos"]))
    distilled = position == "absolute" and draw(st.booleans())
    arch = Arch(heads=draw(st.sampled_from([1, 2, 4])), head_dim=draw(st.sampled_from([8, 16])),
                patch=draw(st.sampled_from([8, 16])), grid=draw(st.integers(2, 6)), depth=draw(st.integers(1, 3)),
                mlp_ratio=2.0, num_classes=draw(st.sampled_from([0, 5])), distilled=distilled,
                cls=True if distilled else draw(st.booleans()), reg=0 if distilled else draw(st.sampled_from([0, 1, 4])),
                token_pool=draw(st.booleans()), init_values=draw(st.sampled_from([None, 0.1])),
                qk_norm=draw(st.booleans()), fused=draw(st.booleans()), batch=draw(st.sampled_from([1, 2])),
                position=position)
    if position == "relpos":
        arch.reg = 0  # timm's relative-position ViT has no register tokens
    return arch


@st.composite
def recipes(draw):
    method = draw(st.sampled_from(["tome", "dfe", "dfe_lgtm", "tomato"]))
    over = dict(prop_attn=draw(st.booleans()))
    if method == "tomato":
        over["budget"] = draw(st.one_of(st.integers(0, 40), st.floats(0.0, 0.99)))
        over["merge_block"] = draw(st.integers(0, 3))
    else:
        over["r"] = draw(st.integers(0, 40))
        over["protect"] = draw(st.sampled_from([0, 1, 3]))
        over["skip"] = draw(st.one_of(st.just("auto"), st.integers(0, 3)))
    if method == "dfe_lgtm":
        over["window"] = draw(st.integers(2, 7))
        over["transition"] = draw(st.one_of(st.just("auto"), st.integers(0, 3)))
    return method, over


@settings(max_examples=int(os.environ.get("MERGEPASS_HYPOTHESIS_EXAMPLES", "8")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(arch=archs(), recipe=recipes())
def test_property_merged_and_exact_or_declined(arch, recipe):
    method, over = recipe
    assert check(arch, method, over) == expected_outcome(arch, method, over)
