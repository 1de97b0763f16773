"""Pallas GPU kernels (Triton lowering) with plain-jnp references; imports jax only.

Entry points (each takes impl="pallas" | "xla" | "reference"; interpret=None runs the Pallas
interpreter on CPU backends and compiles on GPU):

- pallas_kernels.flash_attention: flash_attention(q [B,T,H,D], k/v [B,S,K,D], causal, sm_scale,
  q_offset [B], kv_lens [B], soft_cap) -> [B,T,H,D]
- pallas_kernels.paged_attention: paged_attention(q [B,H,D], k/v_pages [P,page,K,D],
  block_tables [B,max_pages], context_lens [B]) -> [B,H,D];
  ragged_paged_attention(q [N,H,D], k/v_pages, block_tables, context_lens,
  query_start_loc [B+1]) -> [N,H,D];
  write_kv_pages(k/v_pages, k/v_new [N,K,D], slot_mapping [N]) -> (k_pages, v_pages)

The functions are not re-exported here: their names equal the subpackages' names.
"""
