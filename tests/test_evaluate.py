"""Evaluation metrics, image folders, the sweep, and auto-scheduling (tiny models, synthetic data)."""
import csv

import pytest
import torch

import mergepass
from mergepass.eval import data, evaluate
from helpers import benchmark, tiny_vit


def _folder(tmp_path, n=6, corrupt=1, size=40):
    from PIL import Image
    rows = []
    for i in range(n):
        arr = (torch.rand(size, size + 8, 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(tmp_path / f"{i:03d}.jpg")
        rows.append(dict(file=f"{i:03d}.jpg", class_index=i % 3, wnid="x", name="y"))
    for j in range(corrupt):
        (tmp_path / f"bad{j}.jpg").write_bytes(b"not a jpeg")
        rows.append(dict(file=f"bad{j}.jpg", class_index=0, wnid="x", name="y"))
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "class_index", "wnid", "name"])
        w.writeheader()
        w.writerows(rows)
    return tmp_path


def test_metrics_identical_and_perturbed():
    feats = torch.randn(32, 5, 16)
    same = evaluate.feature_metrics(feats, feats.clone())
    assert same["cls_cos_mean"] == pytest.approx(1.0, abs=1e-6) and same["nn_agree"] == 1.0
    noisy = evaluate.feature_metrics(feats + 0.8 * torch.randn_like(feats), feats)
    assert noisy["cls_cos_mean"] < 0.95 and noisy["cls_cos_p5"] <= noisy["cls_cos_mean"]
    assert noisy["nn_agree"] < 1.0
    logits = torch.randn(20, 10)
    labels = logits.argmax(-1)
    c = evaluate.classifier_metrics(logits, logits, labels)
    assert c["top1_agree"] == 1.0 and c["top1_acc"] == 1.0
    flipped = evaluate.classifier_metrics(-logits, logits, labels)
    assert flipped["top1_agree"] == 0.0 and flipped["top1_acc"] == 0.0


def test_image_folders(tmp_path):
    folder = _folder(tmp_path)
    x, y, skipped = data.load_images(folder, size=32)
    assert x.shape == (6, 3, 32, 32) and skipped == 1 and y.tolist() == [0, 1, 2, 0, 1, 2]
    sub = tmp_path / "sub"
    for cls in ("a", "b"):
        (sub / cls).mkdir(parents=True)
        for p in list(folder.glob("00[0-1].jpg")):
            (sub / cls / p.name).write_bytes(p.read_bytes())
    assert [lbl for _, lbl in data.list_images(sub)] == [0, 0, 1, 1]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_images(tmp_path / "nowhere")


def test_mismatched_checkpoint_names_the_model(tmp_path):
    from mergepass.eval import models
    torch.save(tiny_vit().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="vit_small_patch16_224"):
        models.create("vit_small_patch16_224", checkpoint=str(tmp_path / "w.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        models.create("vit_small_patch16_224", checkpoint=str(tmp_path / "missing.pt"))


def test_evaluate_recipes_on_a_folder(tmp_path):
    folder = _folder(tmp_path, n=8, size=64)
    m = tiny_vit(num_classes=3)
    rows = evaluate.evaluate_recipes("tiny", None, str(folder),
                                     ["none:lower.target=eager", "tome:merge.r=4,lower.target=eager"], img_size=64,
                                     calib_images=0, batch=4, log=lambda s: None, model=m)
    none, tome = rows
    assert none["top1_agree"] == 1.0 and none["logit_cos_mean"] == pytest.approx(1.0, abs=1e-5)
    assert tome["logit_cos_mean"] < 1.0 and tome["macs_ratio"] < 1.0
    assert none["skipped"] == 1 and "top1_acc" in none


def test_pareto_sweep_writes_table_and_plot(tmp_path):
    pareto = benchmark("pareto")
    (tmp_path / "imgs").mkdir()
    folder = _folder(tmp_path / "imgs", n=8, size=64)
    m = tiny_vit(depth=2, img_size=224, num_classes=0)
    specs = ["tome:merge.r=8,lower.target=eager", "tome:merge.r=32,lower.target=eager"]  # timed all the same, without inductor's compile
    rows, skipped = pareto.sweep(m, str(folder), specs, batch=4, calib_images=0, rounds=1, log=lambda s: None)
    assert [r["contender"] for r in rows] == specs and skipped == 1
    assert rows[0]["macs_ratio"] > rows[1]["macs_ratio"] and all(r["speedup"] > 0 for r in rows)
    md = pareto.table(rows)
    lines = md.splitlines()
    assert [ln.split(" | ")[0] for ln in lines if ln.startswith("| tome")] == ["| " + s for s in specs]
    assert "vs int8" not in lines[0]  # no int8 in this run
    rows.append(dict(rows[0], contender="int8", speedup=2.0 * rows[0]["speedup"]))
    ratio = pareto.table(rows).splitlines()[2].split(" | ")[2]
    assert "vs int8" in pareto.table(rows).splitlines()[0] and ratio == "0.50x"
    pareto.plot(rows, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.parametrize("target", [1.5, 2.5])
def test_auto_schedule_meets_target(target, planner):
    s = planner(6, 128, batch=2).plan("auto", search={"target_speedup": target})
    assert s.predicted_speedup >= target and s.merge.method in ("tome", "dfe", "dfe_lgtm")
    s2 = planner(6, 128, batch=2).plan("auto", search={"target_speedup": 0, "max_macs_ratio": 1 / target})
    assert s2.macs_ratio <= 1 / target
    with pytest.raises(ValueError, match="impossible schedule"):
        planner(6, 128, batch=2).plan("auto", search={"target_speedup": 50})


def test_auto_schedule_with_images_and_quality_floor():
    m = tiny_vit(depth=3, img_size=96)
    x = torch.randn(4, 3, 96, 96)
    calib = [torch.randn(4, 3, 96, 96)]
    steps = dict(search_iterations=2)  # the search itself is test_search's; two steps exercise the loop
    s = mergepass.plan(m, x, "auto", search={"target_speedup": 1.5, **steps}, calibration=calib)
    assert s.predicted_speedup >= 1.5 and "cos" in s.notes[-1]
    floor = mergepass.plan(m, x, "auto", search={"target_speedup": 0, "min_cosine": 0.999, **steps}, calibration=calib)
    loose = mergepass.plan(m, x, "auto", search={"target_speedup": 0, "min_cosine": 0.9, **steps}, calibration=calib)
    assert loose.predicted_speedup >= floor.predicted_speedup
    be = mergepass.backend("auto", search={"target_speedup": 1.5, **steps}, calibration=calib, lower="eager")
    with torch.no_grad():
        torch.compile(m, backend=be, dynamic=False)(x)
    assert be.schedule.predicted_speedup >= 1.5 and be.schedule.merge.method != "auto"


def test_breakdown_attributes_kernels_to_groups():
    breakdown = benchmark("breakdown")
    from torch._inductor import config as inductor_config
    m = tiny_vit(depth=1)
    x = torch.randn(2, 3, 64, 64)
    rows = {}
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        # all rows: with the class token alone, the one block would drop its merge
        for spec in ("none", "tome_int8:merge.r=3,lower.prune_rows=false"):  # one int8 compile: inductor's caches cannot serve int8 JIT graphs
            fn, _ = evaluate.compile_spec(m, breakdown.jit(spec), calibration=[torch.randn(2, 3, 64, 64)])
            rows[spec] = breakdown.profile_one(fn, x, iters=2)
    plain, merged = rows["none"], rows["tome_int8:merge.r=3,lower.prune_rows=false"]
    assert plain["int8 GEMM"] == 0 and plain["attention"] > 0 and plain["merge"] == 0 and plain["other kernels"] > 0
    assert merged["merge"] > 0 and merged["int8 GEMM"] > 0 and merged["attention"] > 0
    for row in (plain, merged):
        assert row["kernel sum"] == pytest.approx(sum(row[g] for g in breakdown.GROUPS))
    assert "ratio tome_int8:merge.r=3,lower.prune_rows=false" in breakdown.format_table(rows, "t")
    # mergepass's attention ops count as attention, not as merges; OpenVINO's node types map to the same groups
    assert {breakdown.group(f"mergepass::{kind}_attention") for kind in ("bf16", "int8", "int16")} == {"attention"}
    assert breakdown.group("mergepass::bipartite_merge") == "merge"
    nodes = [("FullyConnectedQuantizedLegacy", "brgemm_avx512_i8", "blocks.0.attn.qkv/aten::linear/MatMul"),
             ("FullyConnected", "jit_bf16", "head"), ("MVN", "jit_avx512_bf16", "blocks.0.norm1/aten::layer_norm/MVN"),
             ("Subgraph", "jit_avx512_i8", "blocks.0.attn/aten::scaled_dot_product_attention/ScaledDotProductAttention"),
             ("Subgraph", "jit_avx512_bf16", "blocks.0/aten::add/Add_1")]
    assert [breakdown.ov_group(*n) for n in nodes] == ["int8 GEMM", "other kernels", "other kernels", "attention",
                                                       "other kernels"]


def test_attention_real_records_every_attention_call_and_scores_rows():
    attention_real = benchmark("attention_real")
    m = tiny_vit(depth=2).eval()
    with attention_real.recording() as calls, torch.no_grad():
        for x in [torch.randn(2, 3, 64, 64)] * 3:
            m(x)
    assert len(calls) == 6 and all(t.dim() == 4 for t in calls[0])
    q, k, v = calls[0]
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    err = attention_real.row_errors(want.float(), want)
    assert err.shape == (q.shape[0] * q.shape[1] * q.shape[2],) and err.max() < 1e-6
    assert attention_real.row_errors(torch.zeros_like(want) + 1, want).max() > 0.01


def test_zero_cost_bound_sees_tomes_token_counts():
    zero_cost_bound = benchmark("zero_cost_bound")
    m = tiny_vit(depth=3)
    x = torch.randn(2, 3, 64, 64)
    seen = []
    hooks = [blk.mlp.register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[1])) for blk in m.blocks]
    with torch.no_grad():
        out = zero_cost_bound.SlicedViT(m, r=3)(x)
    for h in hooks:
        h.remove()
    plan = mergepass.plan(m, x, "tome", merge={"r": 3})
    assert seen == [b.tokens_out for b in plan.blocks] and out.shape == m(x).shape


def test_gemm_peak_times_onednns_int8_linear():
    gemm_peak = benchmark("gemm_peak")
    x = torch.randint(0, 128, (24, 64), dtype=torch.uint8)
    w = torch.randint(-127, 128, (40, 64), dtype=torch.int8)
    out = gemm_peak._int8(24, 64, 40, x, w)()
    expect = (0.02 * x.float()) @ (0.01 * w.float()).T  # the scales the timed call uses
    assert out.dtype == torch.float32 and torch.allclose(out, expect, rtol=1e-4, atol=1e-3)
    rows = gemm_peak.time_shapes(2, tokens=5, rounds=2, iters=1, linears={"a": (64, 32), "b": (32, 48)})
    assert [(r["m"], r["k"], r["n"]) for r in rows] == [(10, 64, 32), (10, 32, 48)]
    assert all(r["fp32_ms"] > 0 and r["int8_ms"] > 0 for r in rows)
    table = gemm_peak.format_table(rows, "t")
    ratio = sum(r["fp32_ms"] for r in rows) / sum(r["int8_ms"] for r in rows)
    assert f"int8 GEMMs {ratio:.2f}x faster" in table


def test_targets_check_best_contender_per_floor_and_missing_runs():
    targets = benchmark("targets")
    results = [dict(batch=8, rows=[dict(contender="eager", median_ms=800.0), dict(contender="int8", median_ms=200.0),
                                   dict(contender="tome_int8", median_ms=120.0),
                                   dict(contender="dfe_lgtm_int8", median_ms=100.0)]),
               dict(batch=1, rows=[dict(contender="eager", median_ms=100.0)])]
    rows = {r["floor"]: r for r in targets.check(targets.medians(results))}
    int8, merged, over_int8, b1 = (rows[f.describe()] for f in targets.FLOORS[:4])
    assert rows[targets.FLOORS[6].describe()]["status"] == "not measured"  # no ort_int8 in this run
    assert (int8["ratio"], int8["status"]) == (4.0, "met")
    assert (merged["best"], merged["ratio"], merged["status"]) == ("dfe_lgtm_int8", 8.0, "met")
    assert (over_int8["ratio"], over_int8["status"]) == (2.0, "met")
    assert b1["status"] == "not measured" and b1["ratio"] is None
    results[0]["rows"][3]["median_ms"] = 150.0  # now tome_int8 is best: 200/120 = 1.67 < 2.0
    over_int8 = targets.check(targets.medians(results))[2]
    assert over_int8["best"] == "tome_int8" and over_int8["status"] == "NOT MET"
    results[0]["rows"][2]["median_ms"] = 200.0 / 1.9999  # just under: must not print as 2.00
    over_int8 = targets.check(targets.medians(results))[2]
    assert over_int8["status"] == "NOT MET" and "1.99x" in targets.format_check([over_int8])


def test_targets_count_any_spelling_of_a_recipe_and_say_which_floors_a_cpu_is_outside():
    targets = benchmark("targets")
    floors = (targets.Floor(8, ("tome_int8",), "eager", 7.0, (targets.VNNI_OR_AMX,)),
              targets.Floor(8, ("int8",), "int8:quantize.pt2e.rest=fp32", 1.3,
                            (targets.VNNI_OR_AMX, targets.NATIVE_BF16)),
              targets.Floor(8, ("tome_int8:merge.r=16",), "ov_int8_tome:merge.r=16", 1.25))
    ms = {(8, "eager"): 800.0, (8, "tome_int8:merge.r=12"): 200.0, (8, "int8:quantize.pt2e.rest=fp32"): 390.0,
          (8, "int8"): 300.0, (8, "ov_int8_tome:merge.r=16"): 150.0}
    # r=12 is another recipe than tome_int8's own r=16
    assert [r["status"] for r in targets.check(ms, floors)] == ["not measured", "met", "not measured"]
    ms[(8, "tome_int8:merge.r=16")] = 100.0  # tome_int8's own r, spelled out
    rows = targets.check(ms, floors)
    assert [r["ratio"] for r in rows] == [8.0, 1.3, 1.5] and [r["status"] for r in rows] == ["met"] * 3
    # on a CPU without int8 dot products the floors set for them do not apply; the one over a peer still does
    rows = targets.check(ms, floors, dict(int8_isa="none", bf16_isa="none"))
    assert rows[0]["status"] == rows[1]["status"] == "does not apply: needs VNNI or AMX (int8 ISA: none)"
    assert rows[2]["status"] == "met"
    rows = targets.check(ms, floors, dict(int8_isa="AVX-512 VNNI", bf16_isa="none"))
    assert rows[0]["status"] == "met" and rows[1]["status"] == "does not apply: needs AVX512-BF16 or AMX (bf16: none)"
    assert [r["status"] for r in targets.check(ms, floors, dict(int8_isa="AMX", bf16_isa="AMX-BF16"))] == ["met"] * 3


def test_targets_frontier_compares_the_fastest_points_above_the_fidelity_line():
    targets = benchmark("targets")

    def row(contender, speedup, mean, timed_by="speed.py"):
        return dict(contender=contender, speedup=speedup, cls_cos_mean=mean, timed_by=timed_by)
    rows = [row("ov_int8", 6.0, 0.997), row("ov_int8_tome:merge.r=12", 6.5, 0.991),
            row("ov_int8_tome:merge.r=16", 7.0, 0.986),  # faster, but under the line
            row("ort_int8_tome:merge.r=8", 9.0, 0.995),  # another engine: neither ours nor OpenVINO's
            row("tome_int8:merge.r=16", 9.5, 0.989), row("soft_delayed_protect_int8", 8.6, 0.992),
            row("tome_int8:merge.r=12", 8.0, 0.994)]
    (res,) = targets.check_frontier(rows)
    assert (res["best"], res["peer"]) == ("soft_delayed_protect_int8", "ov_int8_tome:merge.r=12")
    assert res["ratio"] == pytest.approx(8.6 / 6.5) and res["status"] == "met"
    assert "1.32x (soft_delayed_protect_int8 / ov_int8_tome:merge.r=12)" in targets.format_check([res])
    rows[5]["cls_cos_mean"] = 0.9899  # the headline falls under the line: r=12 is the fastest point left
    (res,) = targets.check_frontier(rows)
    assert res["best"] == "tome_int8:merge.r=12" and res["status"] == "NOT MET"
    # rows timed in-sweep are not compared with speed.py's when any row has speed.py's timing
    rows.append(row("int8", 99.0, 0.998, timed_by=None))
    assert targets.check_frontier(rows)[0]["best"] == "tome_int8:merge.r=12"
    assert targets.check_frontier([r for r in rows if r["contender"].startswith("ov_")])[0]["status"] == "not measured"


def test_a_spec_can_skip_dynamos_guards_on_the_modules(monkeypatch):
    """``guards=skip-modules`` hands dynamo torch's module-skipping guard filter and changes no output; another value
    is an error naming the choices."""
    m = tiny_vit(depth=2).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = []
    real = torch.compile
    # a copy: torch.compile takes the filter out of the dict; only the model's compiles, not the backend's own
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (a and a[0] is m and seen.append(dict(k.get("options") or {})))
                        or real(*a, **k))
    torch._dynamo.reset()
    plain, _ = evaluate.compile_spec(m, "tome:merge.r=2,lower.target=eager")
    with torch.no_grad():
        want = plain(x)
    torch._dynamo.reset()
    skipping, _ = evaluate.compile_spec(m, "tome:merge.r=2,lower.target=eager,guards=skip-modules")
    with torch.no_grad():
        got = skipping(x)
    torch._dynamo.reset()
    assert seen == [{}, {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}]
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="guards must be one of"):
        evaluate.compile_spec(m, "tome:guards=none")


def test_a_backbone_is_scored_on_its_tokens_or_on_its_pooled_output(tmp_path):
    """outputs="pooled" scores the graph speed.py times: the model's own forward, whose last block may compute the
    class token alone; its class-token metrics equal those from the token features."""
    folder = _folder(tmp_path, n=8, size=64)
    m = tiny_vit(depth=2, num_classes=0)
    tokens = evaluate.eval_set(m, str(folder), calib_images=0, batch=4, img_size=64)
    pooled = evaluate.eval_set(m, str(folder), calib_images=0, batch=4, img_size=64, outputs="pooled")
    assert tokens.ref.dim() == 3 and pooled.ref.dim() == 2
    torch.testing.assert_close(pooled.ref, tokens.ref[:, 0])
    row, _, be = evaluate.evaluate_spec(pooled, "none:lower.target=eager")
    assert row["cls_cos_mean"] == pytest.approx(1.0, abs=1e-5) and "patch_cos_mean" not in row
    assert any("computes 1 token row" in n for r in be.results for n in r.rewrite.notes)
    with pytest.raises(ValueError, match="outputs"):
        evaluate.eval_set(m, str(folder), outputs="logits")


def test_the_tune_split_scores_the_calibration_images_and_the_report_split_the_rest(tmp_path):
    folder = _folder(tmp_path, n=16, size=64)
    m = tiny_vit(depth=1, num_classes=0)
    report = evaluate.eval_set(m, str(folder), calib_images=8, batch=4, img_size=64)
    tune = evaluate.eval_set(m, str(folder), calib_images=8, batch=4, img_size=64, split="tune")
    assert torch.equal(torch.cat(tune.evals), torch.cat(tune.calib)) and len(tune.ref) == 8
    assert not any(torch.equal(a, b) for a in report.evals for b in report.calib)
    torch.testing.assert_close(torch.cat(report.calib), torch.cat(tune.calib))
    with pytest.raises(ValueError, match="split"):
        evaluate.eval_set(m, str(folder), split="held-out")
