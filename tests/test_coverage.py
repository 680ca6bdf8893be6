"""The coverage table (docs/models.md, mergepass/eval/zoo.py): every row merges exactly as the
eager reference does, or is declined with one warning that names the construct and compiles
unchanged."""
import warnings

import pytest
import torch

import mergepass
from helpers import rel_err
from mergepass.eval.zoo import CASES
from reference import _family, reference_forward

TOL = 1e-5  # relative to the largest output; observed differences are below 5e-7


def _compile_run(case, model, x, **over):
    be = mergepass.backend("tome", lower="eager", **over)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outs = case.run(torch.compile(model, backend=be, dynamic=False), x)
    return be, outs, [w for w in caught if issubclass(w.category, mergepass.MergepassWarning)]


def _reference(case, model, x, schedule):
    fam = _family(model)
    with torch.no_grad():
        if not case.hidden_states:
            return [reference_forward(model, x, schedule)]
        full, maps = reference_forward(model, x, schedule, features=True, hidden=True)
        pooled = fam.pooled(maps[-1]) if hasattr(fam, "pooled") else None
        return [full, *fam.hidden_states(maps)] + ([pooled] if pooled is not None else [])


@pytest.mark.parametrize("case", [c for c in CASES if c.expect == "merged"], ids=lambda c: c.key)
def test_merged_family(case):
    pytest.importorskip(case.source)
    model, x = case.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        eager = case.run(model, x)
    be0, outs0, warned0 = _compile_run(case, model, x, merge={"r": 0})
    assert not warned0, [str(w.message) for w in warned0]
    assert len(outs0) == len(eager)
    for o, e in zip(outs0, eager):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    be, outs, warned = _compile_run(case, model, x, merge={"r": 2})
    assert not warned, [str(w.message) for w in warned]
    assert be.schedule.merging and all(b.merged for b in be.schedule.blocks)
    ref = _reference(case, model, x, be.schedule)
    assert len(outs) == len(ref)
    for o, r in zip(outs, ref):
        assert o.shape == r.shape and rel_err(o, r) <= TOL
    # the merges move the output ten times further than the reference tolerance: the comparison can fail
    assert rel_err(outs[0], eager[0]) > 10 * TOL
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", [c for c in CASES if c.expect == "declined"], ids=lambda c: c.key)
def test_declined_family(case):
    model, x = case.build()
    with torch.no_grad():
        eager = case.run(model, x)
    be, outs, warned = _compile_run(case, model, x, merge={"r": 2})
    assert len(warned) == 1 and case.construct in str(warned[0].message), [str(w.message) for w in warned]
    for o, e in zip(outs, eager):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)


def test_timm_forward_intermediates_are_unmerged_to_full_length():
    """timm's forward_intermediates (what dense-prediction heads read) on a RoPE model: every
    intermediate leaves the merged blocks at full length and equals the reference's unmerged map."""
    from mergepass.eval.zoo import case
    model, x = case("eva02").build()
    be = mergepass.backend("tome", merge={"r": 2}, lower="eager")
    with torch.no_grad():
        final, inter = torch.compile(model.forward_intermediates, backend=be, dynamic=False)(x, indices=3,
                                                                                              output_fmt="NLC")
        full, maps = reference_forward(model, x, be.schedule, features=True, hidden=True)
    assert be.schedule.merging and len(inter) == 3
    assert rel_err(final, full) <= TOL
    for got, want in zip(inter, maps[1:]):
        assert rel_err(got, want[:, 1:]) <= TOL  # intermediates drop the class token
