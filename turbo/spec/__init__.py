"""Speculative decoding in plain PyTorch: draft heads, their trainers, and the tree/verify ops SGLang's
speculative workers need, written without Triton or CUDA. Never imports sglang."""
