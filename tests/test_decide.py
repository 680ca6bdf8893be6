"""Choices by measurement (mergepass/decide.py): the fastest candidate inside the error budget, kept on disk,
reused without timing, timed again on another CPU or version, never a candidate that cannot run."""
import pytest
import torch

import mergepass
from mergepass import cpu, decide
from mergepass.decide import Candidate
from mergepass.kernels import attention


@pytest.fixture(autouse=True)
def _own_decisions(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEPASS_DECISIONS_DIR", str(tmp_path / "decisions"))


def _timer(ms: dict, calls: list):
    def time(fns):
        calls.append(sorted(fns))
        return {name: ms[name] / 1e3 for name in fns}
    return time


EXACT = torch.arange(8.0)


def _candidates(noisy: float = 0.0, broken: str = ""):
    return {"exact": Candidate(lambda: EXACT.clone()),
            "close": Candidate(lambda: EXACT + 1e-4),
            "noisy": Candidate(lambda: EXACT + torch.linspace(-noisy, noisy, 8)),
            "broken": Candidate(None, broken) if broken else Candidate(lambda: EXACT.clone())}


def test_the_fastest_candidate_inside_the_budget_is_chosen():
    calls = []
    ms = {"exact": 3.0, "close": 2.0, "noisy": 1.0, "broken": 0.5}
    d = decide.decide("q", {"n": 1}, _candidates(noisy=4.0, broken="no such instruction"), default="exact",
                      reference=lambda: EXACT, budget=1e-3, timer=_timer(ms, calls))
    assert d.choice == "close" and d.measured and not d.reused
    assert "over the budget" in d.declined["noisy"] and d.declined["broken"] == "no such instruction"
    assert calls == [["close", "exact", "noisy"]]  # a candidate that cannot run is never timed
    assert d.errors["noisy"] > 1e-3 >= d.errors["close"]
    assert "close" in d.line() and "measured" in d.line()
    # with a wider budget the fastest one wins
    d = decide.decide("q", {"n": 2}, _candidates(noisy=4.0), default="exact", reference=lambda: EXACT, budget=1.0,
                      timer=_timer(ms, []))
    assert d.choice == "broken"


def test_a_kept_decision_is_reused_without_timing_again():
    calls = []
    ms = {"exact": 3.0, "close": 2.0, "noisy": 1.0, "broken": 5.0}
    first = decide.decide("q", {"n": 1}, _candidates(), default="exact", timer=_timer(ms, calls))
    assert first.choice == "noisy" and len(calls) == 1

    def must_not_time(fns):
        raise AssertionError("timed again")
    again = decide.decide("q", {"n": 1}, _candidates(), default="exact", timer=must_not_time)
    assert again.reused and again.choice == "noisy" and again.times_ms == first.times_ms
    assert [d.choice for d in decide.kept()] == ["noisy"]
    # other facts (another shape) are another question
    decide.decide("q", {"n": 2}, _candidates(), default="exact", timer=_timer(ms, calls))
    assert len(calls) == 2 and decide.forget() == 2 and decide.kept() == []


def test_a_process_timing_the_same_question_is_waited_for_and_its_decision_reused():
    """While another process holds the question's lock (it is timing), a compile waits, then reads what it kept
    instead of timing again; a different question is not held up."""
    import threading
    from filelock import FileLock
    ms = {"exact": 3.0, "close": 2.0, "noisy": 1.0, "broken": 5.0}
    path = decide.decisions_dir() / f"{decide.key_of('q', {'n': 1})}.json"
    path.parent.mkdir(parents=True)
    other = FileLock(str(path.with_suffix(".lock")))
    other.acquire()
    got, calls = [], []
    waiting = threading.Thread(target=lambda: got.append(
        decide.decide("q", {"n": 1}, _candidates(), default="exact", timer=_timer(ms, calls))))
    waiting.start()
    waiting.join(1.0)
    assert waiting.is_alive() and not calls  # held up by the lock, not timing
    free = decide.decide("q", {"n": 2}, _candidates(), default="exact", timer=_timer(ms, []))
    assert free.measured and not free.reused
    decide._write(path, decide.Decision("q", "close", {"close": 2.0}, measured=True))  # what the holder measured
    other.release()
    waiting.join(10.0)
    assert not waiting.is_alive() and not calls
    assert got[0].choice == "close" and got[0].reused


@pytest.mark.parametrize("change", ["cpu flags", "torch version", "threads"])
def test_another_cpu_or_version_times_again(monkeypatch, change):
    calls = []
    ms = {"exact": 3.0, "close": 2.0, "noisy": 1.0, "broken": 5.0}
    decide.decide("q", {"n": 1}, _candidates(), default="exact", timer=_timer(ms, calls))
    if change == "cpu flags":
        monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    elif change == "torch version":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    else:
        threads = torch.get_num_threads()
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    again = decide.decide("q", {"n": 1}, _candidates(), default="exact", timer=_timer(ms, calls))
    assert len(calls) == 2 and not again.reused


def test_a_kept_choice_that_cannot_run_now_is_never_used():
    calls = []
    decide.decide("q", {"n": 1}, _candidates(), default="exact",
                  timer=_timer({"exact": 3.0, "close": 2.0, "noisy": 4.0, "broken": 1.0}, calls))
    d = decide.decide("q", {"n": 1}, _candidates(broken="its build failed"), default="exact",
                      timer=_timer({"exact": 3.0, "close": 2.0, "noisy": 4.0}, calls))
    assert d.choice == "close" and len(calls) == 2


def test_one_runnable_candidate_is_a_default_not_a_measurement():
    d = decide.decide("q", {}, {"exact": Candidate(lambda: EXACT), "op": Candidate(None, "the CPU has no VNNI")},
                      default="exact", timer=lambda fns: pytest.fail("nothing to compare"))
    assert d.choice == "exact" and not d.measured and "default" in d.line() and "no VNNI" in d.line()
    with pytest.raises(ValueError, match="default 'op' cannot run"):
        decide.decide("q", {}, {"exact": Candidate(lambda: EXACT), "op": Candidate(None, "no VNNI")}, default="op")


def test_a_damaged_or_linked_decision_file_is_measured_again(tmp_path):
    calls = []
    ms = {"exact": 3.0, "close": 2.0, "noisy": 1.0, "broken": 5.0}
    decide.decide("q", {"n": 1}, _candidates(), default="exact", timer=_timer(ms, calls))
    (path,) = decide.decisions_dir().glob("*.json")
    path.write_text("{not json")
    decide.decide("q", {"n": 1}, _candidates(), default="exact", timer=_timer(ms, calls))
    assert len(calls) == 2
    elsewhere = tmp_path / "planted.json"
    elsewhere.write_text(path.read_text().replace('"noisy"', '"broken"'))
    path.unlink()
    path.symlink_to(elsewhere)
    d = decide.decide("q", {"n": 1}, _candidates(), default="exact", timer=_timer(ms, calls))
    assert len(calls) == 3 and d.choice == "noisy"


def test_attention_choice_times_every_runnable_kernel_on_the_graphs_shape():
    calls = []
    fake = {"sdpa": 3.0, "int16": 2.5, "bf16": 2.0, "int8": 1.0}
    shape = (2, 3, 17, 64)
    d = attention.choose(shape, shape, shape, (2, 1, 1, 17), timer=_timer(fake, calls))
    runnable = ["sdpa"] + [k for k in attention.KINDS if attention.unavailable(k) is None]
    # with SDPA alone (no AVX2 here, or no compiler) there is nothing to compare: nothing is timed, and it says so
    assert calls == ([sorted(runnable)] if len(runnable) > 1 else [])
    assert d.measured == (len(runnable) > 1)
    assert d.choice == min(runnable, key=fake.get)
    for k in attention.KINDS:
        if attention.unavailable(k) is not None:
            assert d.declined[k] == attention.unavailable(k)
    lossy = [k for k in ("int8", "int16") if attention.unavailable(k) is None]
    if lossy:  # their real per-call errors (int8 ~1e-4, int16 ~3e-7) are over a budget of 1e-9
        strict = attention.choose(shape, shape, shape, None, tolerance=1e-9, timer=_timer(fake, []))
        assert strict.choice == "sdpa" and all("over the budget" in strict.declined[k] for k in lossy)


def test_candidates_tied_within_timing_noise_keep_the_more_faithful():
    """Two times within 3% cannot be told apart: the one with the smaller error wins, and says why the other lost;
    further apart, the faster one wins."""
    cands = _candidates(noisy=0.01)
    tied = decide.decide("q", {"n": 1}, cands, default="exact", reference=lambda: EXACT, budget=1.0,
                         timer=_timer({"exact": 1.02, "close": 1.5, "noisy": 1.0, "broken": 1.5}, []))
    assert tied.errors["noisy"] > tied.errors["exact"] and tied.choice == "exact"
    assert "timing noise" in tied.declined["noisy"]
    apart = decide.decide("q", {"n": 2}, cands, default="exact", reference=lambda: EXACT, budget=1.0,
                          timer=_timer({"exact": 1.10, "close": 1.5, "noisy": 1.0, "broken": 1.5}, []))
    assert apart.choice == "noisy" and "noisy" not in apart.declined


def test_the_merge_kernel_is_chosen_per_merge_op_and_the_pipeline_asks_for_its_methods(monkeypatch):
    """ToMe's global merge and soft merging's nearest merge are timed as two questions, each kept; an op without a
    fused kernel is never timed; the compile asks about the op its recipe's method merges with."""
    from mergepass import pipeline
    from mergepass.merge import fused
    from mergepass.methods import MergeOp, get_op
    from helpers import require_fused_merge
    require_fused_merge()
    calls = []
    glob = fused.choose(op=get_op("global"), timer=_timer({"fused": 2.0, "reference": 1.0}, calls))
    soft = fused.choose(op=get_op("soft"), timer=_timer({"fused": 1.0, "reference": 2.5}, calls))
    assert (glob.choice, soft.choice) == ("reference", "fused") and calls == [["fused", "reference"]] * 2
    again = fused.choose(op=get_op("soft"), timer=lambda fns: pytest.fail("timed again"))
    assert again.reused and again.choice == "fused" and fused.choose().choice == "reference"  # default: global
    bare = MergeOp("bare", get_op("global").reference)
    none = fused.choose(op=bare, timer=lambda fns: pytest.fail("nothing to compare"))
    assert none.choice == "reference" and not none.measured and "no fused kernel" in none.line()
    assert soft.line().startswith("merge kernel (soft merge): fused")
    asked, real = [], fused.choose
    monkeypatch.setattr(fused, "choose", lambda op=None, **kw: asked.append(op.name) or real(op=op, **kw))
    for recipe in ("soft_delayed_protect_int8", "tome", "dfe_lgtm", "auto"):
        on, d = pipeline.merge_kernel_stage(mergepass.load_recipe(recipe), (torch.randn(1, 3, 8, 8),))
        assert on == (d.choice == "fused")
    assert asked == ["soft", "global", "global", "global"]
