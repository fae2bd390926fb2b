"""bench/kernels_static.py's reading of compiled code and its time model, on hand-made inputs."""

import dataclasses
import importlib.util
import os
import sys

import pytest

from pallas import quantized_matmul as qmm

# Loaded from its path: bench/ on sys.path would let its scripts shadow installed packages for
# every later test of the session (names_test.py).
_SPEC = importlib.util.spec_from_file_location(
    "kernels_static",
    os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "kernels_static.py"),
)
kernels_static = sys.modules["kernels_static"] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(kernels_static)

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LOP3.LUT R2, R3, 0x3, RZ, 0xc0, !PT ;
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/                   SHF.R.U32.HI R3, RZ, 0x2, R3 ;
        /*0040*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0050*/                   IADD3 R5, R5, 0x1, RZ ;
        /*0054*/                   IADD3 R6, R6, 0x1, RZ ;
        /*0058*/                   IADD3 R7, R7, 0x1, RZ ;
        /*005c*/                   IADD3 R8, R8, 0x1, RZ ;
        /*0060*/              @!P1 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
"""


def test_loop_body_is_the_backward_branch_span_that_holds_the_mma():
    # The second loop is longer but holds no MMA; the K loop is the first.
    assert kernels_static.loop_body(SASS) == ["LOP3", "HMMA", "SHF", "BRA"]


def test_a_kernel_without_a_k_loop_counts_whole():
    # One K step per program: the one-trip loop is gone, the whole kernel is the tile's work
    # (the trailing self-branch that parks a finished warp is no K loop).
    sass = """
        /*0000*/                   LOP3.LUT R2, R3, 0x3, RZ, 0xc0, !PT ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, RZ ;
        /*0020*/                   EXIT ;
.L_x_9:
        /*0030*/                   BRA `(.L_x_9) ;
"""
    assert kernels_static.loop_body(sass) == ["LOP3", "HMMA", "EXIT", "BRA"]


def test_prediction_floors_by_hand():
    gpu = kernels_static.GPUS[90]
    k = n = 8192
    blocks = qmm.BlockSizes(
        block_m=16, block_n=128, block_k=256, k_splits=4, num_warps=8, num_stages=4
    )
    weight_bytes = k * n // 4  # 2 bits a weight, scales left out
    # 2.2 instructions a weight: 2.2 * 32768 / 256 = 281.6 body instructions, where issue and
    # memory meet on an H100 (the kernel issue's goal): 0.25 B / 3.35e12 B/s against
    # 2.2 / (132 * 128 * 1.755e9) a weight.
    out = kernels_static.predict(gpu, k, n, 1, blocks, 281.6, weight_bytes)
    assert out["instructions_per_weight"] == pytest.approx(2.2)
    assert out["programs"] == 64 * 4 and out["sm_share"] == 1.0
    memory = (weight_bytes + k * 2 + n * 2) / 3.35e12
    issue = 2.2 * k * n / (132 * 128 * 1.755e9)
    assert out["floors_us"]["memory"] == pytest.approx(memory * 1e6)
    assert out["floors_us"]["issue"] == pytest.approx(issue * 1e6)
    assert issue / memory == pytest.approx(1.0, abs=0.01)
    bf16 = (k * n + k + n) * 2 / 3.35e12
    assert out["predicted_speedup_vs_bf16"] == pytest.approx(bf16 / max(memory, issue))
    # Splits that overrun the K tiles (43 tiles in 9 splits of 5: 45 steps) pay for their
    # extra steps in issue and tensor time, not in bytes.
    uneven = dataclasses.replace(blocks, k_splits=9)
    ragged = kernels_static.predict(gpu, 43 * 256, n, 1, uneven, 281.6, weight_bytes)
    even = kernels_static.predict(gpu, 45 * 256, n, 1, uneven, 281.6, weight_bytes)
    assert ragged["floors_us"]["issue"] == pytest.approx(even["floors_us"]["issue"])
    assert ragged["floors_us"]["tensor"] == pytest.approx(even["floors_us"]["tensor"])
    ragged_bytes = weight_bytes + 43 * 256 * 2 + n * 2
    assert ragged["floors_us"]["memory"] == pytest.approx(ragged_bytes / 3.35e12 * 1e6)
    # Fewer programs than SMs: only that share of the machine works.
    few = kernels_static.predict(gpu, 256, 1024, 1, blocks, 281.6, 256 * 1024 // 4)
    assert few["programs"] == 8 * 4 and few["sm_share"] == pytest.approx(32 / 132)
