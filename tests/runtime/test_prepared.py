"""Prepared weights (issue 30, item 3): linears packed once (fp32 in panels for the fused kernels' GEMM,
or oneDNN's reordered layout), sibling projections that read one input merged into one GEMM (learnt on
the first forward), the same outputs as the model's own modules within fp32 rounding; what cannot be
prepared (Conv1D, ``nn.Linear`` subclasses, fp16, torchao int8, tied) is left alone. Each test that
holds for both GEMMs runs on both (``kernels``: panels where the kernels are built)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.runtime.families import build_family  # noqa: E402

from chainserve.runtime.backends.cpu_kernels import cpu_kernels  # noqa: E402
from chainserve.runtime.backends.hf_parts import layer_list  # noqa: E402
from chainserve.runtime.backends.prepared import (  # noqa: E402
    MIN_ROWS,
    PreparedLinear,
    prepare_alone,
    prepare_linears,
    prepared_dtypes,
)

pytestmark = pytest.mark.skipif(torch.float32 not in prepared_dtypes(False), reason="no oneDNN in this torch")
torch.set_num_threads(1)


def _skip_without_kernels() -> None:
    if cpu_kernels() is None:
        pytest.skip("the fused CPU kernels are not built here")


@pytest.fixture(params=[False, True], ids=["onednn", "panels"])
def kernels(request) -> bool:
    """Whether fp32 weights go to panels (the fused kernels' GEMM) or to oneDNN's layout."""
    if request.param:
        _skip_without_kernels()
    return request.param


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """``family(name)``: the tiny random model of that family, in fp32, loaded once."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            out = build_family(name, tmp_path_factory.mktemp(name))
            loaded[name] = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        return loaded[name]

    return get


def _modes(model) -> dict[str, str]:
    return {name: m.mode for name, m in model.named_modules() if isinstance(m, PreparedLinear)}


def _logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("name", ["llama", "qwen2", "phi3", "deepseek_v3", "qwen2_moe", "gpt_neox", "gemma3"])
def test_prepared_model_computes_what_the_model_does(family, name, kernels):
    """Two forwards (the first learns the siblings, the second runs them merged) equal the model's own."""
    model = family(name)
    prepared = copy.deepcopy(model)
    assert prepare_linears(torch.nn.ModuleList(layer_list(prepared)[1]), kernels) > 0
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    want = _logits(model, ids)
    for _ in range(2):
        torch.testing.assert_close(_logits(prepared, ids), want, rtol=1e-4, atol=1e-4)
    assert all(mode != "learning" for mode in _modes(prepared).values())


def test_llama_merges_qkv_and_gate_up_but_not_the_outputs(family, kernels):
    """q/k/v and gate/up merge, o and down stay alone; the parameters still count every weight once
    (panels: and the zero columns that fill a GEMM's last panel)."""
    prepared = copy.deepcopy(family("llama"))
    prepare_linears(prepared.model.layers, kernels)
    _logits(prepared, torch.tensor([[1, 2, 3]]))
    _logits(prepared, torch.tensor([[4, 5]]))
    modes = {k.split("layers.0.", 1)[1]: v for k, v in _modes(prepared).items() if "layers.0." in k}
    assert modes == {
        "self_attn.q_proj": "merged", "self_attn.k_proj": "merged", "self_attn.v_proj": "merged",
        "self_attn.o_proj": "packed", "mlp.gate_proj": "merged", "mlp.up_proj": "merged", "mlp.down_proj": "packed",
    }  # fmt: skip
    gemms = {id(m.merged or m): m.merged or m for m in prepared.modules() if isinstance(m, PreparedLinear)}
    filler = sum(g.weight.numel() - g.out_features * g.weight.shape[-2 if kernels else -1] for g in gemms.values())
    assert filler == 0 or kernels
    original = sum(p.numel() for p in family("llama").parameters())
    assert sum(p.numel() for p in prepared.parameters()) - filler == original


def test_a_family_with_fused_projections_merges_nothing(family, kernels):
    """Phi-3 ships qkv_proj and gate_up_proj: its siblings of one width read different tensors."""
    prepared = copy.deepcopy(family("phi3"))
    prepare_linears(prepared.model.layers, kernels)
    for ids in ([[1, 2, 3]], [[4]]):
        _logits(prepared, torch.tensor(ids))
    assert set(_modes(prepared).values()) == {"packed"}


def test_conv1d_subclasses_fp16_int8_and_tied_weights_are_left_alone(family):
    gpt2 = copy.deepcopy(family("gpt2"))  # Conv1D, not nn.Linear
    assert prepare_linears(gpt2.transformer.h) == 0
    falcon = copy.deepcopy(family("falcon"))  # FalconLinear: a subclass with its own forward
    assert prepare_linears(falcon.transformer.h) == 0
    half = torch.nn.Sequential(torch.nn.Linear(8, 8)).half()
    assert prepare_linears(half) == 0
    shared = torch.nn.Linear(8, 8)
    assert prepare_linears(torch.nn.ModuleDict({"a": torch.nn.Sequential(shared), "b": shared})) == 0
    tied = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    tied[1].weight = tied[0].weight
    assert prepare_linears(tied) == 0
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layers = copy.deepcopy(family("llama").model.layers)
    quantize_(layers, Int8WeightOnlyConfig())
    assert prepare_linears(layers) == 0


class _TwoHeads(torch.nn.Module):
    """Three siblings of one width: ``a`` (biased) and ``b`` (not) read ``x``; ``c`` reads ``a``'s output."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(16, 16), torch.nn.Linear(16, 5, bias=False), torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.c(self.a(x)), self.b(x)


@pytest.mark.parametrize("dtype", sorted(prepared_dtypes(), key=str))
def test_merged_siblings_with_and_without_bias(dtype, kernels):
    torch.manual_seed(0)
    module = _TwoHeads().to(dtype)
    prepared = copy.deepcopy(module)
    assert prepare_linears(prepared, kernels) == 3
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    with torch.inference_mode():
        for shape in ((1, 1, 16), (1, 2, 16), (3, 2, 16), (16, 2, 16)):  # (1, 1): the lone-row path; 2, 3 rows: padded
            x = torch.randn(*shape, dtype=dtype)
            for got, want in zip(prepared(x), module(x), strict=True):
                torch.testing.assert_close(got, want, **tol)
    assert [m.mode for m in (prepared.a, prepared.b, prepared.c)] == ["merged", "merged", "packed"]
    assert prepared.a.merged.input is None  # both slices taken: the merged output is not kept


def test_few_rows_compute_what_they_do_among_others():
    """Issue 30, oneDNN: one row multiplies the transposed fp32 copy, two or three the reordered weight
    padded with zero rows to MIN_ROWS, more the reordered weight; a row's output is the same (to fp32
    rounding) either way, merged or alone."""
    torch.manual_seed(0)
    prepared = _TwoHeads()
    prepare_linears(prepared, kernels=False)
    x = torch.randn(8, 1, 16)
    with torch.inference_mode():
        prepared(x), prepared(x)  # the second call learns the siblings
        assert prepared.a.merged.lone_row.shape == (16, 21) and prepared.c.lone_row.shape == (16, 3)
        together = prepared(x)
        for rows in (slice(r, r + 1) for r in range(8)), (slice(r, r + 2) for r in range(7)):
            for r in rows:
                for got, want in zip(prepared(x[r]), together, strict=True):
                    torch.testing.assert_close(got, want[r], rtol=1e-5, atol=1e-6)
        assert MIN_ROWS == 4 and [y.shape for y in prepared(x[:3])] == [(3, 1, 3), (3, 1, 5)]


def test_panels_give_a_row_the_same_bits_in_any_batch():
    """Issue 30, panels: one packed weight for every row count (no lone-row copy), and a row's output is
    the same bits alone, in any slice of a batch and merged or not (the plain sum over the input in
    order): a session's tokens do not depend on who shares its iteration."""
    _skip_without_kernels()
    torch.manual_seed(0)
    module = _TwoHeads()
    prepared = copy.deepcopy(module)
    prepare_linears(prepared, kernels=True)
    x = torch.randn(30, 1, 16)
    with torch.inference_mode():
        prepared(x), prepared(x)  # the second call learns the siblings
        assert prepared.a.merged.lone_row is None and prepared.c.lone_row is None
        together = prepared(x)
        for rows in (slice(0, 1), slice(7, 8), slice(2, 5), slice(3, 16), slice(1, 30)):
            for got, want in zip(prepared(x[rows]), together, strict=True):
                assert torch.equal(got, want[rows])
        for got, want in zip(together, module(x), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_tied_head_prepared_alone_leaves_the_embedding_its_weight(family, kernels):
    """Issue 30: the orchestrator's LM head, tied to the input embedding, on prepared weights of its own:
    the same logits for one row and for many, the embedding unchanged."""
    model = copy.deepcopy(family("llama"))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    head.weight = embedding.weight
    kept = embedding.weight.detach().clone()
    prepared = prepare_alone(head, kernels)
    assert isinstance(prepared, PreparedLinear) and prepared.mode == "packed"
    with torch.inference_mode():
        for rows in (1, 2, 5):
            x = torch.randn(rows, head.in_features)
            torch.testing.assert_close(prepared(x), head(x), rtol=1e-5, atol=1e-5)
    assert embedding.weight is head.weight and torch.equal(embedding.weight, kept)
    assert prepare_alone(torch.nn.Linear(4, 4).half(), kernels).__class__ is torch.nn.Linear
