"""moelab.kernels: Triton kernels for the optimized MoE path (DeepSpeed-MoE §5.4).

What will live here (the kernels issue):

- ``gating``: softmax over experts, top-k and capacity slots in one kernel that writes the dense
  token-to-expert mapping table (a per-expert prefix count over tokens, the paper's Blelloch scan).
- ``permute``: gather tokens into the expert-major buffer from the mapping table, and the combine
  that scatters them back to token order weighted by the gates.
- ``grouped_ffn``: the expert FFN over variable-size expert segments as one launch.

Nothing is importable from here yet; ``MoE(backend="triton")`` says so clearly.
"""
