"""The native RMSNorm (native/rms_norm): what `RMSNorm.reference` (Hugging Face's formula with
PyTorch ops) gives, up to float32 summation order, in bf16 and float32, for rows split over threads
or not; the model's norms take it only for rows without autograd."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from loramux.model.llama import RMSNorm
from loramux import native
from loramux.native import available, rms_norm
from test_native_lora import assert_rounded_once

pytestmark = pytest.mark.skipif(not available(), reason="the native kernels cannot run on this machine")

EPS = 1e-5


def _norm(size: int, dtype: torch.dtype, seed: int = 0) -> RMSNorm:
    norm = RMSNorm(size, EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(size, generator=torch.Generator().manual_seed(seed)))
    return norm


def _hf_formula(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm in float64 up to the last step, then as transformers rounds: bf16 rows get the
    normed rows rounded, times the weight, rounded again."""
    h = x.double()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    if x.dtype == torch.float32:
        return (normed * weight.double()).float()
    return (weight.double() * normed.to(x.dtype).double()).to(x.dtype)


# (rows, width): one row; a width that is not a multiple of 16 lanes; rows enough to be split over threads
SHAPES = [(1, 576), (7, 40), (300, 576)]


@pytest.mark.parametrize("rows,size", SHAPES)
def test_bf16_rows_as_transformers_rounds_them(rows, size):
    norm = _norm(size, torch.bfloat16)
    x = (3 * torch.randn(rows, size, generator=torch.Generator().manual_seed(1))).bfloat16()
    x[0, :5] = 0  # zeros inside a row change nothing
    got = rms_norm.rms_norm_native(x, norm.weight, EPS)
    reference = norm.reference(x)
    assert got.shape == x.shape
    # float32 sums in another order: at most one bf16 step from PyTorch's, nearly always equal
    assert_rounded_once(got, reference, min_equal=0.99)
    torch.testing.assert_close(got.double(), _hf_formula(x, norm.weight).double(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("rows,size", SHAPES)
def test_float32_rows_match_pytorch(rows, size):
    norm = _norm(size, torch.float32)
    x = 3 * torch.randn(rows, size, generator=torch.Generator().manual_seed(2))
    got = rms_norm.rms_norm_native(x, norm.weight, EPS)
    torch.testing.assert_close(got, norm.reference(x), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(got, _hf_formula(x, norm.weight), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_avx2_cpu_runs_the_avx2_build(dtype):
    """The same source built for AVX2 (8 lanes): a width with a tail, rows split over threads."""
    norm = _norm(584, dtype)
    x = torch.randn(300, 584, generator=torch.Generator().manual_seed(6)).to(dtype)
    with mock.patch.object(native, "cpu_isa", return_value="avx2"), \
            mock.patch.object(rms_norm, "_kernels", wraps=rms_norm._kernels) as kernels:
        got = rms_norm.rms_norm_native(x, norm.weight, EPS)
    assert "loramux-avx2-" in kernels.call_args.args[0]._name
    if dtype == torch.float32:
        torch.testing.assert_close(got, _hf_formula(x, norm.weight), rtol=2e-6, atol=1e-6)
    else:
        assert_rounded_once(got, norm.reference(x), min_equal=0.99)


def test_a_zero_row_stays_zero():
    norm = _norm(64, torch.bfloat16)
    assert torch.equal(rms_norm.rms_norm_native(torch.zeros(2, 64, dtype=torch.bfloat16), norm.weight, EPS),
                       torch.zeros(2, 64, dtype=torch.bfloat16))


def test_the_model_norm_takes_it_only_without_autograd():
    norm = _norm(40, torch.float32)
    x = torch.randn(3, 40, requires_grad=True)
    calls = mock.Mock(wraps=rms_norm.rms_norm_native)
    with mock.patch("loramux.model.llama.rms_norm_native", calls):
        with torch.no_grad():
            without_grad = norm(x)
        assert calls.call_count == 1
        with_grad = norm(x)
        assert calls.call_count == 1 and with_grad.requires_grad
    torch.testing.assert_close(without_grad, with_grad.detach(), rtol=2e-6, atol=1e-6)


def test_tensors_it_does_not_take():
    w = torch.ones(8)
    assert not rms_norm.accepts(torch.ones(4, 8, dtype=torch.float64), w.double())  # float64
    assert not rms_norm.accepts(torch.ones(8, 4).T, w)  # not contiguous
    assert not rms_norm.accepts(torch.ones(2, 4, 8), w)  # not [rows, n]
    assert not rms_norm.accepts(torch.ones(4, 8, dtype=torch.bfloat16), w)  # weight in another dtype
