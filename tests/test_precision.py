"""Every built-in variant under CPU bf16 and fp16 autocast: output and input gradient close to its own
fp32 result (within a small multiple of softmax's error under the same autocast), and finite at a hot
logit scale (logit std ~3e4, where fp16 products overflow unless a variant keeps an fp32 island).

The measured errors are recorded in BENCHMARKS.md (`vitsweep bench kernels`, which computes them).
"""

import pytest

from benchmarks.kernels import DTYPES, HOT_SCALE, VARIANTS, autocast_errors

# A variant's autocast error may be this many times softmax's own (measured: at most 1.4x).
ERROR_FACTOR = 3.0


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_autocast_error_is_within_a_small_multiple_of_softmax(variant, dtype):
    ref_out, ref_grad, _ = autocast_errors("softmax", DTYPES[dtype])
    out_err, grad_err, finite = autocast_errors(variant, DTYPES[dtype])
    assert finite
    assert out_err <= ERROR_FACTOR * ref_out, (out_err, ref_out)
    assert grad_err <= ERROR_FACTOR * ref_grad, (grad_err, ref_grad)
    assert out_err > 0  # autocast really ran in the narrow dtype


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_output_and_gradient_stay_finite_at_a_hot_logit_scale(variant, dtype):
    *_, finite = autocast_errors(variant, DTYPES[dtype], qk_scale=HOT_SCALE)
    assert finite
