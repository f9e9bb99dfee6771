"""The lean Llama layer (issue 30, :mod:`chainserve.runtime.backends.lean`): a span whose Llama layers
run it computes bit for bit what the same span computes through the model's own layer forward (a
prefill from 0, a batch of decodes at different positions, a chunk after a cached prefix, decodes
and a chunk packed into one forward: there up to the GEMM's rounding over more rows), on
prepared and plain weights; other layer classes and eager attention keep the model's forward. The head runs
just the final norm and the LM head where that is bit for bit what the model's forward computes."""

import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

from tests.runtime.families import build_family  # noqa: E402

from chainserve.runtime.backends.base import SpanInfo, SpanStep  # noqa: E402
from chainserve.runtime.backends.cpu_kernels import cpu_kernels  # noqa: E402
from chainserve.runtime.backends.lean import LeanLayer, lean_layer  # noqa: E402
from chainserve.runtime.backends.torch_backend import TorchSpan  # noqa: E402
from chainserve.runtime.backends.torch_common import torch_to_wire, wire_to_torch  # noqa: E402
from chainserve.runtime.backends.torch_head import TorchHead  # noqa: E402
from chainserve.runtime.models import resolve_model  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return resolve_model("tiny-random", tmp_path_factory.mktemp("models"))


def _steps(span, hiddens, positions, rows):
    return [
        SpanStep(torch_to_wire(h), 1, span.info.slot_pages(range(r * 2, r * 2 + 2)), p)
        for h, p, r in zip(hiddens, positions, rows, strict=True)
    ]


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("prepare", [True, False])
def test_lean_span_is_bit_identical_to_the_models_forward(model_dir, prepare, kernels):
    """On eager ops bit for bit; on the fused CPU kernels (:mod:`.cpu_kernels`, where built) up to float
    rounding (their sums run in another order)."""
    if kernels and cpu_kernels() is None:
        pytest.skip("the fused CPU kernels could not be built here")
    info = SpanInfo(1, 2, 8, 64)
    lean = TorchSpan(model_dir, info, prepare=prepare, kernels=kernels)
    plain = TorchSpan(model_dir, info, prepare=prepare, kernels=False)
    assert all(layer.fused_decode is kernels for layer in lean.lean)
    assert all(isinstance(layer, LeanLayer) for layer in lean.lean)
    plain.lean = [None] * len(plain.lean)
    gen = torch.Generator().manual_seed(0)
    size = lean.hidden_size
    waves = [  # (hidden per row, position per row, rows)
        ([torch.randn(1, 5, size, generator=gen) for _ in range(3)], [0, 0, 0], [0, 1, 2]),
        ([torch.randn(1, 1, size, generator=gen) for _ in range(2)], [5, 5], [0, 1]),
        ([torch.randn(1, 1, size, generator=gen) for _ in range(3)], [6, 5, 5], [0, 1, 2]),  # ragged lengths
        ([torch.randn(1, 3, size, generator=gen)], [7], [0]),  # a chunk after a cached prefix
        ([torch.randn(1, 1, size, generator=gen)], [10], [0]),  # a lone row
        # decodes beside a chunk: one packed forward here, one forward per length in the plain span
        ([torch.randn(1, q, size, generator=gen) for q in (1, 1, 3)], [11, 6, 6], [0, 1, 2]),
    ]
    for hiddens, positions, rows in waves:
        got = lean.run_steps(_steps(lean, hiddens, positions, rows))
        want = plain.run_steps(_steps(plain, hiddens, positions, rows))
        packed = len({h.shape[1] for h in hiddens}) > 1
        for g, w in zip(got, want, strict=True):
            g, w = wire_to_torch(g, size), wire_to_torch(w, size)
            # a GEMM over more rows may round differently (MKL's kernel depends on them): equal up to that;
            # the kernels' sums run in another order: equal up to rounding at the outputs' scale
            if kernels:
                assert torch.allclose(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))
            else:
                assert torch.allclose(g, w, rtol=1e-5, atol=1e-5) if packed else torch.equal(g, w)
    lean.close(), plain.close()


def test_lean_applies_only_to_llama_layers_under_sdpa(model_dir):
    span = TorchSpan(model_dir, SpanInfo(1, 2, 8, 64))
    layer = span.layers[0]
    assert lean_layer(layer, "sdpa") is not None
    assert lean_layer(layer, "eager") is None
    assert lean_layer(torch.nn.Linear(2, 2), "sdpa") is None
    span.close()


@pytest.mark.parametrize(("name", "fast"), [("llama", True), ("cohere", False), ("gemma2", False)])
def test_head_runs_norm_then_head_only_where_that_is_the_models_logits(tmp_path, name, fast):
    head = TorchHead(build_family(name, tmp_path))
    assert head.norm_then_head is fast  # cohere scales its logits, gemma2 softcaps them
    hidden = [torch_to_wire(torch.randn(1, 4, head.hidden_size, generator=torch.Generator().manual_seed(1)))]
    got = head.logits(hidden, [4])
    head.norm_then_head = False
    assert (got == head.logits(hidden, [4])).all()


@pytest.mark.parametrize("width", [64, 576, 960, 2048])
def test_the_fused_rms_norm_is_bit_identical_to_llamas(width):
    from chainserve.runtime.backends.lean import _rms_norm

    gen = torch.Generator().manual_seed(width)
    weight = torch.randn(width, generator=gen)
    for scale in (1e-3, 1.0, 30.0):
        x = torch.randn(7, 3, width, generator=gen) * scale
        y = x.to(torch.float32)
        want = weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)  # LlamaRMSNorm
        assert torch.equal(_rms_norm(x, weight, 1e-5), want)


def test_warm_up_learns_the_merges_and_changes_no_later_answer(model_dir):
    """A block server warms its span before its first session (issue 30): the merged GEMMs are learnt
    and reordered then; a session served after it gets what a cold span gives it once that has learnt
    them too (a cold span's first two forwards run unmerged GEMMs: equal up to their rounding)."""
    info = SpanInfo(1, 2, 8, 64)
    warm, cold = TorchSpan(model_dir, info), TorchSpan(model_dir, info)
    assert warm.warm_up() > 0
    assert {m.mode for m in warm.layers.modules() if hasattr(m, "mode")} == {"merged", "packed"}
    hidden = torch.randn(1, 6, warm.hidden_size, generator=torch.Generator().manual_seed(5))
    for span in (warm, cold, cold, cold):  # the same session on the pages the warm-up used
        span.out = span.run_steps(_steps(span, [hidden], [0], [0]))[0]
    assert torch.equal(wire_to_torch(warm.out, warm.hidden_size), wire_to_torch(cold.out, cold.hidden_size))
    tight = TorchSpan(model_dir, SpanInfo(1, 2, 1, 64))  # one block-slot: no session fits, nothing to warm
    assert tight.warm_up() < 1
    warm.close(), cold.close(), tight.close()
