"""The inference defaults read from the CPU: bfloat16 only where it is native."""

import torch

from llmarch.inference.device import auto_dtype, native_bfloat16, physical_cores


def test_bfloat16_only_with_native_support():
    assert auto_dtype("cpu", frozenset({"avx512f", "avx512_bf16"}))[0] == torch.bfloat16
    assert auto_dtype("cpu", frozenset({"amx_bf16"}))[0] == torch.bfloat16
    dtype, why = auto_dtype("cpu", frozenset({"avx512f", "avx2"}))
    assert dtype == torch.float32 and "no native bfloat16" in why
    assert not native_bfloat16(frozenset())


def test_physical_cores_is_at_most_the_logical_count():
    import os

    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))
