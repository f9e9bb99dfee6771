"""The family zoo (issue 29): each tiny random model reloads, generates varied tokens without NaN, and
answers a left-padded ragged batch exactly as each prompt alone."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.runtime.families import FAMILIES, WINDOW, WINDOWED, build_family  # noqa: E402

NEW_TOKENS = 24
PROMPTS = ("Hello, how are you today?", "What is the capital of France? Tell me about the chain of servers.")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """``zoo(name)``: (model, tokenizer, directory) of a family, built into a temp dir and reloaded once."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            out = build_family(name, tmp_path_factory.mktemp(name))
            model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            tokenizer = transformers.AutoTokenizer.from_pretrained(out, padding_side="left")
            loaded[name] = model.eval(), tokenizer, out
        return loaded[name]

    return get


def _chat(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def _greedy(model, tokenizer, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """New token ids (left-padded batch) and the last step's scores."""
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences[:, batch["input_ids"].shape[1] :], torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("name", FAMILIES)
def test_generates_varied_tokens(zoo, name):
    model, tokenizer, _ = zoo(name)
    for text in PROMPTS:
        tokens, scores = _greedy(model, tokenizer, [_chat(tokenizer, text)])
        assert not torch.isnan(scores).any(), name
        assert tokens.shape[1] > 1 and len(set(tokens[0].tolist())) > 1, (name, tokens)


@pytest.mark.parametrize("name", FAMILIES)
def test_ragged_batch_equals_alone(zoo, name):
    model, tokenizer, _ = zoo(name)
    prompts = [_chat(tokenizer, text) for text in PROMPTS]
    assert len(prompts[0]) != len(prompts[1])
    batched, _ = _greedy(model, tokenizer, prompts)
    for row, prompt in zip(batched.tolist(), prompts, strict=True):
        alone = _greedy(model, tokenizer, [prompt])[0][0].tolist()
        assert row[: len(alone)] == alone, name
        assert set(row[len(alone) :]) <= {tokenizer.pad_token_id}, name  # stopped at EOS: padding after


@pytest.mark.parametrize("name", WINDOWED)
def test_sliding_window_matters(zoo, name):
    """Where a family slides a small window, 40 tokens see less than with the window opened up."""
    model, _, out = zoo(name)
    assert model.config.sliding_window == WINDOW
    ids = torch.arange(3, 43).unsqueeze(0)
    wide = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, sliding_window=4096)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits[0, -1], wide.eval()(ids).logits[0, -1], atol=1e-3), name


def test_deterministic_for_a_seed(tmp_path):
    """The same seed writes the same weights; another seed, others."""
    weights = [
        (build_family("qwen3_moe", tmp_path / f"{seed}-{i}", seed=seed) / "model.safetensors").read_bytes()
        for seed, i in ((0, 0), (0, 1), (1, 0))
    ]
    assert weights[0] == weights[1] != weights[2]


def test_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="family: 'nope'"):
        build_family("nope", tmp_path)
