"""Benchmark scripts on the tiny model (CPU): each writes its JSON and markdown; and the
helpers that cut `profile_decode`'s trace to the decode loop."""

import json

import pytest
from helpers import load_script


def test_bench_roofline_writes_its_record(tmp_path):
    bench = load_script("bench_roofline")
    assert bench.parse_shapes("1x2048,64x1024") == [(1, 2048), (64, 1024)]
    assert bench.parse_shapes("none") == []
    # the GPU's default layout (fused projections, unrolled layers, per-layer cache), on CPU
    result = bench.main(["--model", "tiny", "--prefill", "none", "--decode", "2x32",
                         "--impls", "xla", "--layout", "inference", "--repeats", "2",
                         "--out", str(tmp_path)])
    assert result["layout"] == "inference"
    (row,) = result["phases"]
    assert row["phase"] == "decode" and row["batch"] == 2 and row["kv_len"] == 32
    assert row["step_s"] > 0 and row["datasheet_step_s"] > 0 and row["pct_of_floor"] > 0
    if row["breakdown"] is not None:  # optional profiler path; with it, matmuls are attributed
        by_cat = {b["category"]: b["measured_s"] for b in row["breakdown"]}
        assert by_cat["q/k/v projections"] > 0 and by_cat["gate/up/down projections"] > 0
    saved = json.loads((tmp_path / "bench_roofline.json").read_text())
    assert saved["ceilings"]["measured"]["read_bytes_per_s"] > 0
    assert abs(saved["xla_cross_check"]["decode"]["flop_ratio"] - 1) < 0.03
    assert "| decode | xla | 2 | 1 | 32 |" in (tmp_path / "bench_roofline.md").read_text()
    assert (tmp_path / "roofline_measured.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_api_calls_writes_both_paths(tmp_path):
    result = load_script("bench_api_calls").main(
        ["--model", "configs/models/tiny.yaml", "--calls", "2", "--new-tokens", "3",
         "--out", str(tmp_path), "--tag", "t"])
    rows = result["seconds_per_call"]
    assert set(rows) == {"fresh Generator per call", "jdecode.generate"}
    assert all(len(ts) == 2 and min(ts) > 0 for ts in rows.values())
    assert json.loads((tmp_path / "api_calls_t.json").read_text())["seconds_per_call"] == rows
    assert "| jdecode.generate |" in (tmp_path / "api_calls_t.md").read_text()


def test_tune_decode_attention_checks_every_launch_of_both_caches(tmp_path):
    """scripts/tune_decode_attention.py on the tiny model in interpret mode: each launch of
    the dense and the paged kernel is checked against its reference before it would be timed
    (nothing is timed on CPU), a launch the kernel rejects is recorded, not fatal, and the
    record names the case."""
    tune = load_script("tune_decode_attention")
    common = ["--model", "tiny", "--batch", "2", "--context", "40", "--layers", "2",
              "--warps", "4", "--stages", "2", "--out", str(tmp_path)]
    paged = tune.main(["--cache", "paged", "--max-len", "64", "--block-k", "8,16",
                       "--splits", "1,2", "--prefetch", "0,1", *common])
    rows = {(r["block_k"], r["splits"], r["prefetch"]): r for r in paged["rows"]}
    assert set(rows) == {(b, s, p) for b in (8, 16) for s in (1, 2) for p in (False, True)}
    assert all("page size" in rows[8, s, p]["error"] for s in (1, 2) for p in (False, True))
    assert not any("error" in rows[16, s, p] for s in (1, 2) for p in (False, True))
    dense = tune.main(["--cache", "dense", "--max-len", "128", "--block-k", "64",
                       "--prefetch", "0,1", *common])
    plain, pf = dense["rows"]  # the hand-pipelined loop is checked too, at 1 stage
    assert not plain["prefetch"] and plain["stages"] == 2 and pf["prefetch"] and pf["stages"] == 1
    assert not any("error" in r for r in (plain, pf)) and plain["splits"] >= 1
    assert dense["best"] is None  # untimed
    saved = json.loads((tmp_path / "tune_decode_attention_paged_tiny_b2.json").read_text())
    assert saved["cache"] == "paged" and saved["page"] == 16
    # --dtype float32 (the engine's SmolLM2 dtype): checked, 4-byte K/V counted, and written
    # beside the bf16 record instead of over it.
    f32 = tune.main(["--cache", "paged", "--max-len", "64", "--block-k", "16", "--splits", "1",
                     "--dtype", "float32", *common])
    assert not any("error" in r for r in f32["rows"]) and len(f32["rows"]) == 1
    assert f32["kv_bytes_per_layer"] == 2 * paged["kv_bytes_per_layer"]
    assert json.loads((tmp_path / "tune_decode_attention_paged_tiny_b2_float32.json")
                      .read_text())["dtype"] == "float32"


def test_profile_decode_counts_only_the_loops_kernels():
    prof = load_script("profile_decode")
    # (name, start ns, duration ns): a prefill kernel before the loop's window, one that
    # runs past its end, and two steps' kernels inside it
    events = [("prefill_gemm", 0, 50), ("attn", 100, 6), ("gemv", 110, 2), ("attn", 120, 4),
              ("after", 128, 10)]
    inside = prof.in_window(events, 100, 130)
    assert [e[0] for e in inside] == ["attn", "gemv", "attn"]
    rows = prof.kernel_table(inside, steps=2)
    assert [r["kernel"] for r in rows] == ["attn", "gemv"]
    assert rows[0]["calls_per_step"] == 1.0
    assert rows[0]["us_per_step"] == pytest.approx(1e-3 * 10 / 2)
    assert rows[0]["us_per_call"] == pytest.approx(1e-3 * 10 / 2)
    assert rows[1]["calls_per_step"] == 0.5
    # each row carries its kernel's launch where the trace named one
    rows = prof.kernel_table(inside, steps=2, launches={"attn": {"ctas": 256}})
    assert [r["launch"] for r in rows] == [{"ctas": 256}, {}]


def test_bench_kernels_decode_table_names_each_variants_launch():
    """The paged decode table carries each variant's top kernel's launch (CTAs, CTAs an SM,
    registers) from the profiler, "-" where nothing was traced (CPU), and errors stay rows;
    the prefetch section's launches each name a variant."""
    bench = load_script("bench_kernels")
    launch = {"ctas": 256, "ctas_per_sm": 2.0, "regs": 128, "threads": 128}
    point = {"B": 8, "context": 4096,
             "ours_default": {"us": 40.0, "TBps": 3.36, "device_us": 39.4, "TBps_device": 3.41,
                              "compile_s": 1.2, "kernels": [{"kernel": "paged_attention_decode",
                                                             "launch": launch}]},
             "ours_pf_split4_bk64_w4": {"us": 41.0, "TBps": 3.27, "compile_s": 1.0},
             "ours_pf_split8_bk32_w2": {"error": "RuntimeError('x')"},
             "ours_best": {"config": "ours_default"}}
    env = {"date": "2026-12-08", "device_kind": "NVIDIA H200", "jax": "0.11.2", "git": "abc",
           "command": "bench_kernels.py --only decode_b8_pf"}
    text = bench.markdown({"env": env, "decode_b8_pf": point})
    assert "| ours_default | 40.0 | 3.36 | 39.4 | 3.41 | 1.2 | 256, 2.0, 128 |" in text
    assert "| ours_pf_split4_bk64_w4 | 41.0 | 3.27 | error | error | 1.0 | - |" in text
    assert "| ours_pf_split8_bk32_w2 | error |" in text
    assert "best of ours: ours_default" in text
    # the best is ranked by device time where one was traced, and errors are not ranked
    res = {"ours_a": {"TBps": 3.0, "TBps_device": 3.2}, "ours_b": {"TBps": 3.1,
           "TBps_device": 3.1}, "ours_c": {"error": "x"}, "anchor": {"TBps": 9.0}}
    bench.mark_best_of_ours(res)
    assert res["ours_best"] == {"config": "ours_a", "TBps": 3.0, "TBps_device": 3.2}
    names = {f"ours_pf_split{s}_bk{bk}_w{w}" for s, bk, w in bench.PREFETCH_LAUNCHES}
    assert len(names) == len(bench.PREFETCH_LAUNCHES) and "ours_pf_split4_bk64_w4" in names


def test_bench_flash_times_two_kernels_in_turns():
    """`interleaved`: every round times both, the order reversed every other round, so a
    clock that drifts during the run weighs on both alike; the ratio is the median of the
    rounds' ratios. With every call 10% slower than the last, it reads 2.01 for a true 2,
    where all of one then all of the other would read 2 * 1.1 ** 4 = 2.93."""
    bench = load_script("bench_flash")
    calls, clock = [], [1.0]

    def time_one(name):  # "slow" takes twice "fast"'s time; every call 10% slower than the last
        calls.append(name)
        clock[0] *= 1.1
        return clock[0] * (2.0 if name == "slow" else 1.0) * 1e-3

    r = bench.interleaved({"fast": "fast", "slow": "slow"}, 4, time_one)
    assert calls == ["fast", "slow", "slow", "fast", "fast", "slow", "slow", "fast"]
    assert r["rounds"] == 4 and len(r["ms"]["fast"]) == len(r["ms"]["slow"]) == 4
    assert r["ratio"]["slow"] == pytest.approx(2.0, rel=0.01)
    assert r["median_ms"]["slow"] > r["median_ms"]["fast"]


def test_deviceless_check_table_rows_have_the_headers_columns():
    """Every row of deviceless_check's table, a case without Triton kernels (Mosaic only)
    included, has as many cells as the header, the pipelining column among them."""
    check = load_script("deviceless_check")
    kernel = {"name": "paged_attention_decode", "num_warps": 4, "num_stages": 2,
              "grid": [8, 8, 4], "id": "k1", "status": "compiled", "registers": 128,
              "spill_store_bytes": 8, "spill_load_bytes": 4, "shared_bytes": 106496,
              "ctas_per_sm": 2, "pipelining": {"rings": ["1x128x128xbf16"], "loop_waits": [0],
                                               "loop_tensor_loads": 2}}
    result = {"date": "d", "jax_version": "0.11.2", "triton_wheel": "3.9.0", "git_sha": "s",
              "command": "c", "target": "NVIDIA H200",
              "rows": [{"case": "flash mosaic", "lowering": "ok", "mosaic_calls": 1,
                        "triton_kernels": []},
                       {"case": "paged decode B8 S4096", "lowering": "ok", "mosaic_calls": 0,
                        "triton_kernels": [kernel]}]}
    table = [ln for ln in check.markdown(result).splitlines() if ln.startswith("|")]
    assert len(table) == 4  # header, rule, two rows
    assert len({ln.count("|") for ln in table}) == 1
    assert table[3].endswith("| 1x128x128xbf16; 0 |")
