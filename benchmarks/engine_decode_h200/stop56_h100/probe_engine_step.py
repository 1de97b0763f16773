"""The engine's 64-row general decode step (runner._forward_sample) of SmolLM2 in f32 and the 1B in
bf16, compiled for sm_90a without a card: its Triton kernels' registers, spills, shared memory.
Run on main and with patches/f32-paged-blocks.patch applied; probe_engine_step.log has both.

    bash scripts/deviceless_env.sh run python benchmarks/engine_decode_h200/stop56_h100/probe_engine_step.py
"""
from jdecode.analysis import deviceless_cases as cases
from pallas_kernels import deviceless as dl
for name, dtype in (("smollm2-135m", "float32"), ("llama-3.2-1b", "bfloat16")):
    cfg, params = cases.model_params(name, dtype)
    fn, args = cases.engine_forward_case(cfg, params, 64)
    with dl.as_gpu(), dl.TritonCapture() as cap:
        dl.lower(fn, *args)
    for k in cap.kernels:
        r = dl.compile_triton(k)
        print(name, dtype, k["name"], k["num_warps"], k["grid"], {x: r.get(x) for x in ("status", "registers", "spill_store_bytes", "shared_bytes", "ctas_per_sm")}, flush=True)
