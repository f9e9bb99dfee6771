"""L, s_m and s_c measured on the meta device (issue 29, item 2), checked family by family against a real
CPU instantiation: one layer's parameters, and the bytes of the KV cache after a real forward of N tokens."""

import json

import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
transformers = pytest.importorskip("transformers", reason="the torch extra is not installed")
from transformers import AutoModelForCausalLM, DynamicCache

from chainserve.runtime.model_facts import measure, measure_dir

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # past_key_values, in the real forwards

#: Attention sizes every tiny family shares (4 heads of 16, 2 KV heads where the family has GQA).
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=128)
GQA = {**SMALL, "num_key_value_heads": 2}
#: family → (config, where its layer list is on the CausalLM: read independently of the measurement).
FAMILIES = {
    "llama": (lambda: transformers.LlamaConfig(**GQA), "model.layers"),
    "mistral": (lambda: transformers.MistralConfig(**GQA, sliding_window=16), "model.layers"),
    "qwen2": (lambda: transformers.Qwen2Config(**GQA), "model.layers"),
    "qwen3_moe": (
        lambda: transformers.Qwen3MoeConfig(**GQA, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
        "model.layers",
    ),
    "mixtral": (lambda: transformers.MixtralConfig(**GQA, num_local_experts=4, num_experts_per_tok=2), "model.layers"),
    "gemma2": (lambda: transformers.Gemma2Config(**GQA, head_dim=16, sliding_window=16), "model.layers"),
    "gpt2": (
        lambda: transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0),
        "transformer.h",
    ),
    "gpt_neox": (lambda: transformers.GPTNeoXConfig(**SMALL), "gpt_neox.layers"),
    "falcon": (  # the new decoder architecture caches all heads, not num_kv_heads (Falcon-40B's trap)
        lambda: transformers.FalconConfig(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=128,
            new_decoder_architecture=True,
            num_kv_heads=2,
        ),  # fmt: skip
        "transformer.h",
    ),
    "bloom": (lambda: transformers.BloomConfig(hidden_size=64, n_layer=3, n_head=4, vocab_size=128), "transformer.h"),
    "deepseek_v3": (  # MLA: a latent and a rope key of different sizes; a dense first layer, then MoE
        lambda: transformers.DeepseekV3Config(
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            vocab_size=128,
            n_group=2,
            topk_group=1,
        ),  # fmt: skip
        "model.layers",
    ),
}
TOKENS = 5


def real_facts(config, where: str) -> tuple[int, list[int], list[int]]:
    """Layers, parameters per layer and KV elements per token per layer of a real fp32 CPU model."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    layers = model
    for attr in where.split("."):
        layers = getattr(layers, attr)
    params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    cache = DynamicCache(config=config)
    with torch.no_grad():
        model(input_ids=torch.arange(TOKENS).unsqueeze(0) % 100, past_key_values=cache, use_cache=True)
    kv = [(layer.keys.nbytes + layer.values.nbytes) // 4 for layer in cache.layers]  # fp32: 4 bytes
    assert all(n % TOKENS == 0 for n in kv)
    return len(layers), params, [n // TOKENS for n in kv]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_meta_measurement_equals_real_model(family):
    make, where = FAMILIES[family]
    facts = measure(make())
    assert facts.model_type == family
    num_layers, params, kv = real_facts(make(), where)
    assert facts.num_blocks == num_layers == 3
    assert facts.params_per_block == max(params)
    assert facts.kv_elements_per_token_per_block == max(kv)
    assert facts.active_params_per_block <= facts.params_per_block


def test_family_traps_are_measured_not_assumed():
    facts = {family: measure(make()) for family, (make, _) in FAMILIES.items()}
    assert facts["llama"].kv_elements_per_token_per_block == 2 * 2 * 16  # K + V · 2 KV heads · head_dim 16
    assert facts["falcon"].kv_elements_per_token_per_block == 2 * 4 * 16  # all 4 heads, not num_kv_heads = 2
    assert facts["deepseek_v3"].kv_elements_per_token_per_block == 16 + 8  # latent (kv_lora_rank) + rope key
    # MoE: the routed experts count 2 of 4 in the active parameters; dense families are all active
    mixtral = facts["mixtral"]
    experts = 4 * 3 * 64 * 96
    assert mixtral.active_params_per_block == mixtral.params_per_block - experts // 2
    assert facts["llama"].active_params_per_block == facts["llama"].params_per_block


def test_deepseek_takes_the_largest_layer():
    make, where = FAMILIES["deepseek_v3"]
    _, params, _ = real_facts(make(), where)
    assert params[0] != params[1] == params[2]  # the dense first layer differs from the MoE ones
    assert measure(make()).params_per_block == max(params)


def test_mixtral_8x7b_per_block():
    """Mixtral-8x7B's real config (mistralai/Mixtral-8x7B-v0.1), built on the meta device: 1.45 G
    parameters per block where the old Llama formula counted 218 M (one expert's MLP)."""
    config = transformers.MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
    )  # fmt: skip
    facts = measure(config)
    attention = 2 * 4096 * 4096 + 2 * 4096 * 1024
    expert = 3 * 4096 * 14336
    rest = 4096 * 8 + 2 * 4096  # router and two RMSNorms
    assert facts.num_blocks == 32
    assert facts.params_per_block == attention + 8 * expert + rest == 1_451_270_144
    assert facts.active_params_per_block == attention + 2 * expert + rest
    assert facts.kv_elements_per_token_per_block == 2 * 8 * 128


def test_hybrid_and_unreadable_models_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hybrid or recurrent"):
        measure(transformers.MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=128))
    with pytest.raises(ValueError, match="^model: cannot read"):
        measure_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-family"}))
    with pytest.raises(ValueError, match="^model:"):
        measure_dir(tmp_path)


CLUSTER = """
model: {path: tiny-qwen2, dtype: bf16, max_tokens: 256}
workload: {arrival_rate: 1.0, prompt_tokens: 100, output_tokens: 10}
servers:
  - {name: s, count: 3, memory_gb: 0.0004, tau_p_s: 0.01, rtt_ms: 5}
"""


def test_plan_measures_a_model_directory(tmp_path, monkeypatch):
    """``chainserve plan`` on a cluster whose model is a local directory prints the measured L, s_m and
    KV bytes per token per block (table and ``--json``); without the torch extra, one ``error:`` line."""
    from typer.testing import CliRunner

    from chainserve import extras
    from chainserve.cli import app

    config = transformers.Qwen2Config(**{**GQA, "num_hidden_layers": 6})
    config.save_pretrained(tmp_path / "tiny-qwen2")
    (tmp_path / "cluster.yaml").write_text(CLUSTER)
    facts = measure_dir(tmp_path / "tiny-qwen2")
    assert (facts.num_blocks, facts.kv_elements_per_token_per_block) == (6, 2 * 2 * 16)
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "cluster.yaml"), "--json", "--planner", "greedy"])
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["problem"]["model"]
    assert model["num_blocks"] == facts.num_blocks
    assert model["block_size_gb"] == pytest.approx(facts.params_per_block * 2 / 1e9)
    assert model["kv_bytes_per_token_per_block"] == facts.kv_elements_per_token_per_block * 2 == 128
    assert model["cache_size_gb"] == pytest.approx(128 * 256 / 1e9)
    assert model["measured_from"] == str((tmp_path / "tiny-qwen2").resolve())
    table = CliRunner().invoke(app, ["plan", str(tmp_path / "cluster.yaml"), "--planner", "greedy"], terminal_width=400)
    assert table.exit_code == 0, table.output
    line = " ".join(table.stdout.split())
    assert f"L = 6 blocks of {facts.params_per_block * 2 / 1e9:.4g} GB, KV 128 bytes per token per block" in line
    assert "measured from" in line
    real_find_spec = extras.find_spec
    monkeypatch.setattr(extras, "find_spec", lambda name: None if name == "torch" else real_find_spec(name))
    missing = CliRunner().invoke(app, ["plan", str(tmp_path / "cluster.yaml")])
    assert missing.exit_code == 2
    assert missing.stderr.strip().splitlines() == [
        "error: model.path: a model given by its directory needs the 'torch' extra (torch is not installed): "
        "pip install 'chainserve[torch]'"
    ]
