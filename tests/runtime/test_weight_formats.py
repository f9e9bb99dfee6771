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
