"""f32 fused verify steps of 32-64 rows at both model shapes, compiled for sm_90a without a card:
status, registers, spill stores and shared memory per kernel. Output: probe_f32_rows.log.

    bash scripts/deviceless_env.sh run python benchmarks/deviceless_h200/stop56_f32/probe_f32_rows.py
"""
from jdecode.analysis import deviceless_cases as cases
from pallas_kernels import deviceless as dl
for name, tokens in (("smollm2-135m", 32), ("smollm2-135m", 48), ("llama-3.2-1b", 8), ("llama-3.2-1b", 16), ("llama-3.2-1b", 32), ("llama-3.2-1b", 64)):
    cfg, params = cases.model_params(name, "float32")
    fn, args = cases.step_case(cfg, params, "pallas-fused", 1, tokens)
    with dl.as_gpu(), dl.TritonCapture() as cap:
        dl.lower(fn, *args)
    seen = {}
    for k in cap.kernels:
        if k["name"] in seen: continue
        r = dl.compile_triton(k); seen[k["name"]] = (r["status"], r.get("registers"), r.get("spill_store_bytes"), r.get("shared_bytes"))
    print(name, tokens, seen, flush=True)
