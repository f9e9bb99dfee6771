"""Cluster files (YAML / raw JSON) and the paper presets (paper §1, §4.1, §4.2)."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from chainserve.model import catalogue
from chainserve.model.cluster_file import load_cluster, problem_from_dict
from chainserve.model.formats import FormatSizes
from chainserve.model.presets import paper_sim_cluster, paper_testbed
from chainserve.model.spec import ModelSpec, SpecError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


BASE = """
model: llama-2-7b
workload: {arrival_rate: 1.0, prompt_tokens: 100, output_tokens: 10}
servers:
"""


# --- examples and presets ------------------------------------------------------------------------


def test_sim_example_equals_preset():
    preset = paper_sim_cluster(20, 0.2, np.random.default_rng(2026))
    assert load_cluster(EXAMPLES / "paper-sim-bloom-20.yaml") == preset


def test_testbed_example_equals_preset():
    assert load_cluster(EXAMPLES / "paper-testbed-llama2-7b.yaml") == paper_testbed()
    assert load_cluster(EXAMPLES / "paper-testbed-llama2-13b.yaml") == paper_testbed(model="llama-2-13b")


def test_raw_example():
    p = load_cluster(EXAMPLES / "raw-instance.json")
    raw = json.loads((EXAMPLES / "raw-instance.json").read_text())
    assert p.name == "raw-small" and p.model.num_blocks == raw["num_blocks"]
    assert [(s.name, s.memory_gb, s.tau_p_s, s.tau_c_s) for s in p.servers] == [
        (str(s["server_id"]), s["memory_gb"], s["tau_p"], s["tau_c"]) for s in raw["servers"]
    ]
    assert p.workload.arrival_rate_per_s == raw["arrival_rate"] and p.workload.rho_bar == raw["rho_bar"]


def test_raw_format_detected_by_content_in_yaml(tmp_path):
    text = (EXAMPLES / "raw-instance.json").read_text()
    assert load_cluster(write(tmp_path, text, "inst.yaml")) == load_cluster(EXAMPLES / "raw-instance.json")


@pytest.mark.parametrize(("num_servers", "eta", "num_high"), [(10, 0.1, 1), (20, 0.2, 4), (30, 0.3, 9), (40, 0.4, 16)])
def test_paper_sim_cluster_shape(num_servers, eta, num_high):
    p = paper_sim_cluster(num_servers, eta, np.random.default_rng(1))
    high = [s for s in p.servers if s.gpu == "a100-3g.40gb"]
    assert len(p.servers) == num_servers and len(high) == num_high
    assert all(s.tau_p_s == 0.109 and s.memory_gb == 40 for s in high)
    assert all(s.tau_p_s == 0.175 and s.memory_gb == 20 for s in p.servers if s not in high)
    assert all(0.010 <= s.rtt_s <= 0.100 for s in p.servers)
    assert all(math.isclose(s.tau_c_s, (s.rtt_s + 0.018) * 20) for s in p.servers)
    assert p.model.num_blocks == 70 and math.isclose(p.model.cache_size_gb, 2 * 14336 * 2048 * 2 / 1e9)
    assert p.workload.arrival_rate_per_s == 0.2 and p.workload.rho_bar == 0.7


def test_paper_sim_cluster_seeded():
    a, b = (paper_sim_cluster(10, 0.3, np.random.default_rng(7)) for _ in range(2))
    assert a == b
    assert a != paper_sim_cluster(10, 0.3, np.random.default_rng(8))


@pytest.mark.parametrize(("args", "field"), [((0, 0.2), "num_servers"), ((10, 1.5), "eta")])
def test_paper_sim_cluster_rejects(args, field):
    with pytest.raises(SpecError) as err:
        paper_sim_cluster(*args, np.random.default_rng(0))
    assert err.value.field == field


# --- defaults and derivations --------------------------------------------------------------------


def test_gpu_entry_defaults(tmp_path):
    p = load_cluster(write(tmp_path, BASE + "  - {gpu: 3g.40gb, count: 2, rtt_ms: [10, 30]}\n"))
    arch, gpu = catalogue.model_arch("llama-2-7b"), catalogue.gpu_profile("a100-3g.40gb")
    assert [s.name for s in p.servers] == ["a100-3g.40gb-1", "a100-3g.40gb-2"]
    assert p.name == "c" and p.model == arch.spec("fp16", max_tokens=110)
    expected_tau_p = catalogue.tau_p_s(gpu, arch, p.model.block_size_gb, 100, 10)
    for server, rtt_s in zip(p.servers, (0.010, 0.030), strict=True):
        assert server.memory_gb == 40 and server.gpu == "a100-3g.40gb" and server.rtt_s == rtt_s
        assert server.tau_p_s == expected_tau_p
        assert math.isclose(server.tau_c_s, catalogue.tau_c_s(rtt_s, 10))


def test_explicit_values_override_profile(tmp_path):
    entry = "  - {gpu: l4, name: edge, memory_gb: 20, tau_p_ms: 50, tau_c_s: 0.5}\n"
    (s,) = load_cluster(write(tmp_path, BASE + entry)).servers
    assert (s.name, s.memory_gb, s.tau_p_s, s.tau_c_s, s.rtt_s) == ("edge", 20, 0.05, 0.5, None)


def test_model_forms_agree(tmp_path):
    servers = "  - {gpu: t4, rtt_s: 0.02}\n"
    top = load_cluster(
        write(tmp_path, BASE.replace("llama-2-7b", "llama-2-7b\ndtype: int8\nmax_tokens: 512") + servers)
    )
    nested = load_cluster(
        write(tmp_path, BASE.replace("llama-2-7b", "{name: llama-2-7b, dtype: int8, max_tokens: 512}") + servers)
    )
    assert top == nested
    assert top.model == catalogue.model_arch("llama-2-7b").spec("int8", max_tokens=512)


def test_raw_model_in_yaml(tmp_path):
    text = """
model: {num_blocks: 4, block_size_gb: 1.5, cache_size_gb: 0.1}
workload: {arrival_rate: 0.3}
servers:
  - {name: a, memory_gb: 10, tau_p_s: 0.2, tau_c_ms: 300}
  - {name: b, memory_gb: 8, tau_p_s: 0.3, rtt_ms: 40}
"""
    p = load_cluster(write(tmp_path, text))
    assert (p.model.name, p.model.num_blocks, p.model.block_size_gb) == ("custom", 4, 1.5)
    assert p.servers[0].tau_c_s == 0.3
    assert math.isclose(p.servers[1].tau_c_s, (0.040 + catalogue.HOP_OVERHEAD_S) * 20)  # default 20 outputs


PATH_MODEL = """
model: {path: models/tiny, max_tokens: 512}
workload: {arrival_rate: 1.0, prompt_tokens: 100, output_tokens: 10}
servers:
  - {name: s, count: 2, memory_gb: 1, tau_p_s: 0.01, rtt_ms: 5}
"""


def fake_resolver(calls):
    """A resolver like the runtime's: records its arguments and returns sizes from them."""

    def resolve(directory, dtype, max_tokens):
        calls.append((directory, dtype, max_tokens))
        nbytes = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
        return ModelSpec(
            "tiny", 6, 1e-4 * nbytes, 128 * nbytes * max_tokens / 1e9, max_tokens=max_tokens,
            kv_bytes_per_token_per_block=128 * nbytes, measured_from=str(directory),
        )  # fmt: skip

    return resolve


def test_model_given_by_its_directory(tmp_path):
    """issue 29: ``model: {path: DIR}`` is measured by the resolver the caller injects (relative DIR: from
    the cluster file's folder); dtype defaults to fp32 and may sit at the top level."""
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    calls = []
    p = load_cluster(write(tmp_path, PATH_MODEL), fake_resolver(calls))
    assert calls == [(tmp_path / "models" / "tiny", "fp32", 512)]
    assert (p.model.num_blocks, p.model.max_tokens, p.model.kv_bytes_per_token_per_block) == (6, 512, 512)
    assert p.model.measured_from == str(tmp_path / "models" / "tiny") and len(p.servers) == 2
    text = PATH_MODEL.replace("max_tokens: 512}", "dtype: bf16}").replace("workload", "max_tokens: 64\nworkload")
    assert load_cluster(write(tmp_path, text), fake_resolver(calls)).model.block_size_gb == pytest.approx(2e-4)
    assert calls[-1] == (tmp_path / "models" / "tiny", "bf16", 64)
    absolute = PATH_MODEL.replace("models/tiny", str(tmp_path / "elsewhere"))
    load_cluster(write(tmp_path, absolute), fake_resolver(calls))
    assert calls[-1] == (tmp_path / "elsewhere", "fp32", 512)


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (("max_tokens: 512}", "dtype: int8}"), "model.dtype", "fp32, bf16, fp16"),
        (("max_tokens: 512}", "name: x}"), "model.name", "unknown key"),
        (("workload", "max_tokens: 9\nworkload"), "model.max_tokens", "both here and at the top level"),
        (("tau_p_s: 0.01, ", ""), "servers[0].tau_p_s", "required"),
    ],
)
def test_model_directory_errors(tmp_path, change, field, words):
    with pytest.raises(SpecError, match=rf"^{re.escape(field)}: .*{words}"):
        load_cluster(write(tmp_path, PATH_MODEL.replace(*change)), fake_resolver([]))


def test_model_directory_needs_a_resolver_and_reports_its_errors(tmp_path):
    with pytest.raises(SpecError, match=r"^model\.path: .*measured by the runtime"):
        load_cluster(write(tmp_path, PATH_MODEL))

    def broken(directory, dtype, max_tokens):
        raise ValueError("model: 'mamba' has linear_attention layers that keep no KV cache per token")

    with pytest.raises(SpecError, match=r"^model\.path: 'mamba' has linear_attention"):
        load_cluster(write(tmp_path, PATH_MODEL), broken)


def test_a_bare_name_outside_the_catalogue_is_a_model_to_measure(tmp_path):
    """issue 29: ``model: gemma3-270m`` (a model the runtime builds) goes to the resolver like
    ``{path: gemma3-270m}``; a catalogue name stays the catalogue's; a name neither knows says both."""
    text = PATH_MODEL.replace("model: {path: models/tiny, max_tokens: 512}", "model: gemma3-270m\nmax_tokens: 512")
    assert "model: gemma3-270m" in text
    calls = []
    assert load_cluster(write(tmp_path, text), fake_resolver(calls)).model.measured_from == "gemma3-270m"
    assert calls == [(Path("gemma3-270m"), "fp32", 512)]

    def unknown(directory, dtype, max_tokens):
        raise ValueError(f"model: {str(directory)!r} is neither a known name (tiny-random) nor a directory")

    with pytest.raises(SpecError, match=r"^model: unknown model 'gemma3-27m'.*nor a model to measure: .*neither"):
        load_cluster(write(tmp_path, text.replace("gemma3-270m", "gemma3-27m")), unknown)


def test_problem_from_dict_names_itself():
    data = {
        "name": "mine",
        "model": "smollm2-135m",
        "workload": {"arrival_rate": 2},
        "servers": [{"gpu": "t4", "rtt_ms": 5}],
    }
    p = problem_from_dict(data, default_name="ignored")
    assert p.name == "mine" and p.servers[0].name == "t4"


# --- errors --------------------------------------------------------------------------------------

SERVER_ERRORS = [
    (
        "  - {gpu: t4, rtt_ms: 5}\n  - {name: x, memory_gb: -3, tau_p_s: 1, tau_c_s: 1}\n",
        "servers[1].memory_gb",
        "positive",
    ),
    ("  - {gpu: z80, rtt_ms: 5}\n", "servers[0].gpu", "unknown gpu"),
    ("  - {gpu: t4, memroy_gb: 5, rtt_ms: 5}\n", "servers[0].memroy_gb", "did you mean 'memory_gb'"),
    ("  - {gpu: t4, count: 2, rtt_ms: [5]}\n", "servers[0].rtt_ms", "expected 2 values"),
    ("  - {gpu: t4, rtt_ms: [5, -1], count: 2}\n", "servers[0].rtt_ms[1]", "non-negative"),
    ("  - {gpu: t4}\n", "servers[0].rtt_ms", "required"),
    ("  - {memory_gb: 5, tau_p_s: 1, tau_c_s: 1}\n", "servers[0].name", "required"),
    ("  - {name: a, memory_gb: 5, rtt_ms: 1}\n", "servers[0].tau_p_s", "required"),
    ("  - {gpu: t4, rtt_ms: 5, tau_p_s: 1, tau_p_ms: 2}\n", "servers[0].tau_p_s", "not both"),
    ("  - {gpu: t4, rtt_ms: 5, tau_p_s: 1e-3}\n", "servers[0].tau_p_s", "1.0e-3"),
    ("  - {gpu: t4, rtt_ms: 5, count: 0}\n", "servers[0].count", "positive integer"),
    ("  - {gpu: t4, rtt_ms: 5}\n  - {gpu: t4, rtt_ms: 9}\n", "servers", "unique"),
    ("  - not-a-mapping\n", "servers[0]", "mapping"),
]


@pytest.mark.parametrize(("servers", "field", "words"), SERVER_ERRORS)
def test_server_errors_name_the_field(tmp_path, servers, field, words):
    with pytest.raises(SpecError) as err:
        load_cluster(write(tmp_path, BASE + servers))
    assert err.value.field == field and words in str(err.value)


ONE_T4 = BASE + "  - {gpu: t4, rtt_ms: 5}\n"
TOP_ERRORS = [
    (ONE_T4.replace("llama-2-7b", "gpt-9"), "model", "unknown model"),
    (ONE_T4.replace("llama-2-7b", "{name: gpt-9}"), "model.name", "unknown model"),
    (ONE_T4.replace("arrival_rate: 1.0", "arrival_rate: 0"), "workload.arrival_rate", "positive"),
    (ONE_T4.replace("arrival_rate: 1.0", "arrival_rate: -2"), "workload.arrival_rate", "positive"),
    (ONE_T4.replace("output_tokens: 10", "output_tokens: 10, rho_bar: 1.2"), "workload.rho_bar", "below 1"),
    (ONE_T4.replace("arrival_rate: 1.0, ", ""), "workload.arrival_rate", "missing"),
    (ONE_T4.replace("workload", "workloda"), "workloda", "did you mean 'workload'"),
    (ONE_T4.replace("llama-2-7b", "llama-2-7b\ndtype: fp8"), "dtype", "unknown dtype"),
    (ONE_T4.replace("llama-2-7b", "{name: llama-2-7b, max_tokens: 0}"), "model.max_tokens", "positive"),
    (ONE_T4.replace("llama-2-7b", "{name: llama-2-7b, dtype: fp16}\ndtype: fp16"), "model.dtype", "both"),
    ("model: llama-2-7b\nservers: [{gpu: t4, rtt_ms: 1}]\n", "workload", "missing"),
    ("- just\n- a list\n", "cluster", "mapping"),
]


@pytest.mark.parametrize(("text", "field", "words"), TOP_ERRORS)
def test_top_level_errors_name_the_field(tmp_path, text, field, words):
    with pytest.raises(SpecError) as err:
        load_cluster(write(tmp_path, text))
    assert err.value.field == field and words in str(err.value)


def test_raw_json_errors(tmp_path):
    raw = json.loads((EXAMPLES / "raw-instance.json").read_text())
    del raw["servers"][2]["tau_p"]
    with pytest.raises(SpecError, match=r"servers\[2\]\.tau_p: missing"):
        load_cluster(write(tmp_path, json.dumps(raw), "bad.json"))
    raw = json.loads((EXAMPLES / "raw-instance.json").read_text())
    raw["arrival_rte"] = 1
    with pytest.raises(SpecError, match="arrival_rte: unknown key"):
        load_cluster(write(tmp_path, json.dumps(raw), "bad.json"))


@pytest.mark.parametrize(
    ("text", "name", "words"),
    [
        ("model: [unclosed\n", "bad.yaml", "malformed YAML at line"),
        ('{"servers": [1,]}', "bad.json", "malformed JSON at line 1"),
    ],
)
def test_malformed_files(tmp_path, text, name, words):
    path = write(tmp_path, text, name)
    with pytest.raises(SpecError) as err:
        load_cluster(path)
    assert err.value.field == str(path) and words in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_cluster(tmp_path / "absent.yaml")


# --- weight formats per server (issue 29, item 3) -------------------------------------------------


def test_weights_set_each_servers_sizes(tmp_path):
    """A server's ``weights`` gives its s_m,j and s_c,j (the catalogue's cache is 16-bit in every
    format) and its derived τ^p reads s_m,j; servers without it keep the model's sizes (``None``)."""
    text = BASE + "  - {gpu: a100-80gb, rtt_ms: 10}\n  - {gpu: a100-80gb, name: q, rtt_ms: 10, weights: int8}\n"
    p = load_cluster(write(tmp_path, text))
    arch, gpu = catalogue.model_arch("llama-2-7b"), catalogue.gpu_profile("a100-80gb")
    plain, quantised = p.servers
    assert (plain.weights, plain.block_size_gb, plain.cache_size_gb) == (None, None, None)
    assert quantised.weights == "int8"
    assert p.block_sizes == (arch.block_size_gb("fp16"), arch.block_size_gb("int8"))
    assert p.block_sizes[1] == p.block_sizes[0] / 2 and p.cache_sizes == (p.model.cache_size_gb,) * 2
    assert quantised.tau_p_s == catalogue.tau_p_s(gpu, arch, arch.block_size_gb("int8"), 100, 10)
    assert plain.tau_p_s == catalogue.tau_p_s(gpu, arch, p.model.block_size_gb, 100, 10)


def test_weights_on_raw_and_measured_models(tmp_path):
    """A raw model scales from its ``dtype`` (int8: a byte per parameter, KV in the model's dtype; fp32:
    twice the bytes and a 32-bit cache); a measured model's ``format_sizes`` are taken as they are."""
    raw = {"num_blocks": 4, "block_size_gb": 2.0, "cache_size_gb": 0.5, "dtype": "bf16"}
    data = {
        "model": raw,
        "workload": {"arrival_rate": 1.0},
        "servers": [
            {"name": "a", "memory_gb": 20, "tau_p_s": 0.1, "tau_c_s": 0.1, "weights": "int8"},
            {"name": "b", "memory_gb": 20, "tau_p_s": 0.1, "tau_c_s": 0.1, "weights": "fp32"},
        ],
    }
    p = problem_from_dict(data)
    assert p.block_sizes == (1.0, 4.0) and p.cache_sizes == (0.5, 1.0)
    measured = ModelSpec(
        "m", 4, 2.0, 0.5, dtype="bf16", format_sizes=(FormatSizes("int8", 1.25, 0.5),)
    )  # fmt: skip
    assert measured.sizes_for("int8") == (1.25, 0.5) and measured.sizes_for("fp16") == (2.0, 0.5)
    instance = {
        "servers": [
            {"server_id": 0, "memory_gb": 10, "tau_c": 0.1, "tau_p": 0.1, "block_size_gb": 0.7, "cache_size_gb": 0.2},
            {"server_id": 1, "memory_gb": 10, "tau_c": 0.1, "tau_p": 0.1, "weights": "int8"},
            {"server_id": 2, "memory_gb": 10, "tau_c": 0.1, "tau_p": 0.1},
        ],
        "num_blocks": 3, "block_size_gb": 1.0, "cache_size_gb": 0.25, "dtype": "fp16", "arrival_rate": 0.1,
    }  # fmt: skip
    p = problem_from_dict(instance)
    assert p.block_sizes == (0.7, 0.5, 1.0) and p.cache_sizes == (0.2, 0.25, 0.25)
    assert [s.weights for s in p.servers] == [None, "int8", None]


def test_no_weights_keeps_the_models_sizes():
    """Without any ``weights`` every server's s_m,j is the model's s_m (so plans are those of before),
    and weights equal to the model's dtype change nothing either."""
    base = load_cluster(EXAMPLES / "paper-testbed-llama2-13b.yaml")
    assert all(s.weights is None and s.block_size_gb is None for s in base.servers)
    assert base.block_sizes == (base.model.block_size_gb,) * base.num_servers
    same = base.model.sizes_for(base.model.dtype)
    assert same == (base.model.block_size_gb, base.model.cache_size_gb)


@pytest.mark.parametrize(
    ("entry", "field", "message"),
    [
        ("weights: int4", "servers[0].weights", "unknown weight format 'int4'"),
        ("weights: nf4", "servers[0].weights", "known: fp32, bf16, fp16, int8"),
        ("weights: 8", "servers[0].weights", "non-empty string"),
        ("wieghts: int8", "servers[0].wieghts", "did you mean 'weights'"),
    ],
)
def test_bad_weights_are_named(tmp_path, entry, field, message):
    with pytest.raises(SpecError, match=re.escape(message)) as err:
        load_cluster(write(tmp_path, BASE + f"  - {{gpu: t4, rtt_ms: 10, {entry}}}\n"))
    assert err.value.field == field


def test_weights_need_a_dtype_for_raw_sizes():
    data = {
        "model": {"num_blocks": 2, "block_size_gb": 1.0, "cache_size_gb": 0.5},
        "workload": {"arrival_rate": 1.0},
        "servers": [{"name": "a", "memory_gb": 20, "tau_p_s": 0.1, "tau_c_s": 0.1, "weights": "int8"}],
    }
    with pytest.raises(SpecError, match="does not say which dtype") as err:
        problem_from_dict(data)
    assert err.value.field == "servers[0].weights"
    data["model"]["dtype"] = "fp8"
    with pytest.raises(SpecError, match="unknown dtype 'fp8'") as err:
        problem_from_dict(data)
    assert err.value.field == "model.dtype"
