"""Load a cluster description (YAML or JSON) into a :class:`Problem` (paper §1, §4).

Two formats, told apart by content (``num_blocks`` at the top means raw); the file extension only
picks the parser (``.json`` → JSON, anything else → YAML, which also reads JSON).

**Cluster format** (short, catalogue-based)::

    name: paper-testbed            # optional, default the file name
    model: llama-2-7b              # catalogue name, or {name, dtype, max_tokens},
                                   # or raw {num_blocks, block_size_gb, cache_size_gb[, name, dtype]},
                                   # or a directory {path: DIR, dtype: fp32|bf16|fp16, max_tokens}
    dtype: fp16                    # optional, default the model's
    max_tokens: 2076               # optional, sizes s_c; default prompt + output tokens (the mean job)
    bprr_sessions: 3               # optional, fixes BPRR's R (default: its rule, plan/baselines/bprr.py)
    load_bandwidth_gb_per_s: 2.0   # optional, weight loading when a re-placement moves blocks (default 2)
    workload: {arrival_rate: 2.57, prompt_tokens: 2048, output_tokens: 28, rho_bar: 0.7}
    servers:
      - {gpu: a100-3g.40gb, count: 3, rtt_ms: [20, 35, 50], name: high}
      - {name: custom, memory_gb: 20, tau_p_s: 0.175, tau_c_s: 1.2, weights: int8}

``model: {path: DIR}`` (issue 29) is a local Hugging Face model directory (or a name the runtime builds,
e.g. ``smollm2-135m``; a relative path is taken from the cluster file's folder): L, s_m and s_c are
measured from it (meta-device build and dry run) by the ``resolve_model`` callable the caller passes,
``(dir, dtype, max_tokens) -> ModelSpec``; this layer imports no torch, so without one such a model is a
:class:`SpecError`. ``dtype`` (the weights' and the KV cache's, default fp32) and ``max_tokens`` may also
sit at the top level; the servers need ``tau_p_s`` (or ``step_cost``) as with a raw model.

**Which length sizes s_c** (``max_tokens``, default ``prompt_tokens + output_tokens``): the **mean**
tokens of a job, prompt + output (for a trace, its mean: the shipped Azure code trace has 2048 + 28
on average, the paper testbed's 2076). With the runtime's KV cache paged by tokens (issue 30) a slot of
c_k is a budget of ``max_tokens`` tokens, chain k holds c_k·T̄ tokens and each job only its own
prompt + output; the tokens of N concurrent jobs concentrate around N·T̄, so c_k stays the expected
number of concurrent jobs, which is what the planner and the bounds count (a larger statistic, the
p95 or the longest job, would plan fewer jobs than the memory holds on average). The price: lengths
vary, so a chain holds more short or fewer long jobs than c_k, and the bounds are exact only for
constant lengths (:mod:`chainserve.analysis.bounds`); a job longer than every chain's c_k·T̄ is refused.
Under the paper's model (a max-length slot per job, the default of the simulator and the experiments)
``max_tokens`` is the longest sequence a slot holds.

``load_bandwidth_gb_per_s`` (GB/s, 0.001..10000, default 2: a local NVMe read) prices a re-placement
by the adaptive controller: a server whose span changes is out of service for s_m × the blocks it did
not hold ÷ this bandwidth (:mod:`chainserve.adapt.cost`).

``workload``: ``arrival_rate`` λ (requests/s, required), ``prompt_tokens`` (2000), ``output_tokens``
(20), ``rho_bar`` ρ̄ (0.7). A server entry stands for ``count`` (1) identical servers named
``name-1 … name-count`` (just ``name`` when count is 1; ``name`` defaults to the gpu profile):

- ``memory_gb`` M_j: default the gpu profile's;
- ``tau_p_s`` or ``tau_p_ms`` τ^p_j: default :func:`catalogue.tau_p_s` for the gpu and model with
  the workload's token lengths;
- ``tau_c_s`` or ``tau_c_ms`` τ^c_j: default ``(RTT + 18 ms) × output_tokens`` from
  ``rtt_ms`` / ``rtt_s`` (one number, or a list with one RTT per server of the entry);
- ``step_cost`` (optional, issue 18): what a batched iteration costs per block
  (:mod:`chainserve.model.step_cost`): ``{alpha_ms, beta_ms, prefill_alpha_ms, prefill_beta_ms, r2}``
  (``_s`` or ``_ms``; prefill ones default to the decode ones; ``r2`` a fit's, informational), or
  ``roofline`` for a gpu and a catalogue model. Without ``tau_p``, τ^p_j is then one job's time at
  batch 1. Absent: the paper's model, every session at speed τ^p_j however many run;
- ``weights`` (optional, issue 29): the format the servers hold their blocks in, ``fp32``, ``bf16``,
  ``fp16`` or ``int8`` (torchao int8 weight-only; it computes and keeps its KV cache in the model's
  dtype); default the model's dtype. It sets the servers' block size s_m,j and cache size per block
  s_c,j (:meth:`ModelSpec.sizes_for <chainserve.model.spec.ModelSpec.sizes_for>`: measured for a model
  given by its directory, from the architecture for a catalogue model, scaled from the model's
  ``dtype`` for a raw one), and the derived τ^p_j and roofline step cost read s_m,j.

``head_cost`` (optional, top level): the orchestrator's batched iteration (embedding, LM head,
sampling) per job stepped together, ``{alpha_ms, beta_ms}``; absent: free.

``hosts`` (optional, top level; issue 31): machines whose CPU cores some servers, and with ``head:
true`` the orchestrator's head, share, each ``{name, cores, servers: [names], head}``
(:class:`~chainserve.model.spec.SharedHost`; ``chainserve profile`` writes one for the torch servers
it ran on its machine's CPU). The batched simulator then shares each host's cores among what computes there.

**Raw format** (seconds and GB, as solvers exchange instances)::

    {"servers": [{"server_id": 0, "memory_gb": 40, "tau_c": 0.9, "tau_p": 0.109}],
     "num_blocks": 70, "block_size_gb": 1.31, "cache_size_gb": 0.117,
     "arrival_rate": 0.2, "rho_bar": 0.7}

(optional: ``name``, ``prompt_tokens``, ``output_tokens``, ``bprr_sessions``, ``load_bandwidth_gb_per_s``,
``max_tokens``: the sequence length ``cache_size_gb`` holds, needed only by ``plan --export petals``,
and ``dtype``: the format the sizes are in, needed by a server's ``weights``; a raw model mapping in the
cluster format takes both too). A raw server may add ``weights`` and its own ``block_size_gb`` /
``cache_size_gb`` (s_m,j, s_c,j; default the model's sizes in ``weights``). Numbers must lie in the ranges of
:mod:`chainserve.model.limits` (times 1e-6..1e6 s, rates 1e-6..1e6/s, sizes 1e-9..1e6 GB, ρ̄ 0.001..0.999,
at most 1000 servers and 1000 blocks, tokens 1..10^6). Every problem raises :class:`SpecError` naming
the field path, e.g. ``servers[2].memory_gb``; unknown keys are errors (typos).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from chainserve.model import catalogue, limits
from chainserve.model.catalogue import GpuProfile, ModelArch
from chainserve.model.formats import FLOAT_BYTES, WEIGHT_FORMATS
from chainserve.model.spec import (
    DEFAULT_LOAD_BANDWIDTH_GB_PER_S,
    ModelSpec,
    Problem,
    Server,
    SharedHost,
    SpecError,
    Workload,
)
from chainserve.model.step_cost import StepCost

WORKLOAD_KEYS = ("arrival_rate", "prompt_tokens", "output_tokens", "rho_bar")
SERVER_KEYS = (
    "name",
    "gpu",
    "count",
    "memory_gb",
    "tau_p_s",
    "tau_p_ms",
    "tau_c_s",
    "tau_c_ms",
    "rtt_ms",
    "rtt_s",
    "step_cost",
    "weights",
)
STEP_COST_STEMS = ("alpha", "beta", "prefill_alpha", "prefill_beta")
HEAD_COST_STEMS = ("alpha", "beta")
RAW_MODEL_KEYS = ("name", "num_blocks", "block_size_gb", "cache_size_gb", "max_tokens", "dtype")
RAW_KEYS = (
    "name",
    "servers",
    "num_blocks",
    "block_size_gb",
    "cache_size_gb",
    "arrival_rate",
    "rho_bar",
    "prompt_tokens",
    "output_tokens",
    "bprr_sessions",
    "load_bandwidth_gb_per_s",
    "max_tokens",
    "dtype",
)
RAW_REQUIRED = ("servers", "num_blocks", "block_size_gb", "cache_size_gb", "arrival_rate")
RAW_SERVER_KEYS = ("server_id", "memory_gb", "tau_c", "tau_p")
RAW_SERVER_OPTIONAL = ("weights", "block_size_gb", "cache_size_gb")
PATH_MODEL_KEYS = ("path", "dtype", "max_tokens")
#: The dtypes a model given by its directory is measured in (the runtime's weights and KV cache).
PATH_DTYPES = tuple(FLOAT_BYTES)
#: ``(dir, dtype, max_tokens) -> ModelSpec``: measures a model directory (given by the runtime layer).
ModelResolver = Callable[[Path, str, int], ModelSpec]


def load_cluster(path: str | Path, resolve_model: ModelResolver | None = None) -> Problem:
    """Read a cluster file; the problem is named after the file unless it names itself.
    ``resolve_model`` measures a ``model: {path: DIR}`` (a relative DIR is taken from the file's folder)."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(str(path), "is a folder, not a cluster file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(path), "no such file") from None
    except UnicodeDecodeError as exc:
        raise SpecError(
            str(path),
            f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); save the cluster file as UTF-8",
        ) from None
    except OSError as exc:
        raise SpecError(str(path), f"cannot read: {exc.strerror or exc}") from None
    return problem_from_dict(_parse(text, path), path.stem, resolve_model, path.parent)


def _parse(text: str, path: Path) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(str(path), f"malformed JSON at line {exc.lineno}: {exc.msg}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(str(path), f"malformed YAML{where}: {problem}") from None


def problem_from_dict(
    data: Any,
    default_name: str = "cluster",
    resolve_model: ModelResolver | None = None,
    base_dir: Path | None = None,
) -> Problem:
    """Build a :class:`Problem` from parsed YAML/JSON (either format); ``resolve_model`` measures a
    ``model: {path: DIR}`` (relative to ``base_dir``, default the working directory).

    >>> p = problem_from_dict({"model": "llama-2-7b", "workload": {"arrival_rate": 1.0},
    ...                        "servers": [{"gpu": "a100-80gb", "count": 2, "rtt_ms": 10}]})
    >>> [s.name for s in p.servers], p.model.num_blocks, p.servers[0].memory_gb
    (['a100-80gb-1', 'a100-80gb-2'], 32, 80)
    """
    data = _mapping(data, "cluster")
    if "num_blocks" in data:
        return _raw_problem(data, default_name)
    _check_keys(
        data,
        "",
        (
            "name",
            "model",
            "dtype",
            "max_tokens",
            "workload",
            "servers",
            "bprr_sessions",
            "load_bandwidth_gb_per_s",
            "head_cost",
            "hosts",
        ),
        required=("model", "workload", "servers"),
    )
    workload = _workload(_mapping(data["workload"], "workload"), "workload")
    arch, model = _model(data, workload, resolve_model, base_dir)
    entries = _list(data["servers"], "servers")
    servers: list[Server] = []
    for i, entry in enumerate(entries):
        servers += _entry_servers(entry, f"servers[{i}]", arch, model, workload)
        if len(servers) > limits.MAX_SERVERS:
            raise SpecError(
                f"servers[{i}]",
                f"the cluster has more than {limits.MAX_SERVERS} servers (the planner's limit on J) after this entry",
            )
    return Problem(
        tuple(servers),
        model,
        workload,
        _string(data.get("name", default_name), "name"),
        bprr_sessions=_bprr_sessions(data),
        load_bandwidth_gb_per_s=_load_bandwidth(data),
        head_cost=_step_cost(data["head_cost"], "head_cost", HEAD_COST_STEMS) if "head_cost" in data else None,
        hosts=_hosts(data["hosts"]) if "hosts" in data else (),
    )


def _hosts(raw: Any) -> tuple[SharedHost, ...]:
    """The ``hosts`` list: ``{name, cores, servers, head}`` each (the names are checked by ``Problem``)."""
    hosts = []
    for i, entry in enumerate(_list(raw, "hosts")):
        path = f"hosts[{i}]"
        entry = _mapping(entry, path)
        _check_keys(entry, path, ("name", "cores", "servers", "head"), required=("name", "cores"))
        head = entry.get("head", False)
        if not isinstance(head, bool):
            raise SpecError(f"{path}.head", f"must be true or false, got {head!r}")
        listed = _list(entry["servers"], f"{path}.servers") if "servers" in entry else []
        names = tuple(_string(n, f"{path}.servers") for n in listed)
        hosts.append(
            SharedHost(_string(entry["name"], f"{path}.name"), _number(entry, "cores", path, CORES), names, head)
        )
    return tuple(hosts)


def replica_servers(
    name: str,
    count: int,
    *,
    memory_gb: float,
    tau_p_s: float,
    round_trips: int,
    rtts_s: Sequence[float] | None = None,
    tau_c_s: float | None = None,
    gpu: str | None = None,
    step: StepCost | None = None,
    weights: str | None = None,
    sizes_gb: tuple[float, float] | None = None,
) -> tuple[Server, ...]:
    """``count`` identical servers ``name-1 … name-count`` (``name`` alone when count is 1).

    τ^c is ``tau_c_s`` when given, else ``(RTT + 18 ms) × round_trips`` from each server's RTT.
    ``sizes_gb``: (s_m,j, s_c,j) in the servers' ``weights`` (``None``: the model's).

    >>> [(s.name, round(s.tau_c_s, 3)) for s in replica_servers("low", 2, memory_gb=20, tau_p_s=0.175,
    ...                                                           round_trips=20, rtts_s=[0.01, 0.1])]
    [('low-1', 0.56), ('low-2', 2.36)]
    """
    names = [name] if count == 1 else [f"{name}-{i}" for i in range(1, count + 1)]
    rtts: Sequence[float | None] = [None] * count if rtts_s is None else rtts_s
    if len(rtts) != count:
        raise SpecError(f"{name}.rtt_s", f"expected {count} RTTs, got {len(rtts)}")
    if tau_c_s is None and rtts_s is None:
        raise SpecError(f"{name}.tau_c_s", "give tau_c_s or the RTTs to derive it from")
    return tuple(
        Server(
            n,
            memory_gb,
            tau_p_s,
            catalogue.tau_c_s(rtt, round_trips) if tau_c_s is None else tau_c_s,
            gpu=gpu,
            rtt_s=rtt,
            step=step,
            weights=weights,
            block_size_gb=None if sizes_gb is None else sizes_gb[0],
            cache_size_gb=None if sizes_gb is None else sizes_gb[1],
        )
        for n, rtt in zip(names, rtts, strict=True)
    )


# --- sections -------------------------------------------------------------------------------------


def _workload(data: Mapping[str, Any], path: str) -> Workload:
    _check_keys(data, path, WORKLOAD_KEYS, required=("arrival_rate",))
    fields: dict[str, Any] = {"arrival_rate_per_s": _number(data, "arrival_rate", path, RATE)}
    if "rho_bar" in data:
        fields["rho_bar"] = _number(data, "rho_bar", path, RHO)
    for key in ("prompt_tokens", "output_tokens"):
        if key in data:
            fields[key] = _count(data, key, path, limits.MAX_TOKENS)
    with _at(path):
        return Workload(**fields)


def _model(
    data: Mapping[str, Any], workload: Workload, resolve_model: ModelResolver | None, base_dir: Path | None
) -> tuple[ModelArch | None, ModelSpec]:
    """The catalogue architecture (``None`` for a raw or measured model) and the ModelSpec."""
    raw = data["model"]
    top_options = [k for k in ("dtype", "max_tokens") if k in data]
    if isinstance(raw, Mapping) and "path" in raw:
        return None, _path_model(data, raw, workload, resolve_model, base_dir)
    if isinstance(raw, Mapping) and "num_blocks" in raw:
        _check_keys(raw, "model", RAW_MODEL_KEYS, required=RAW_MODEL_KEYS[1:4])
        if top_options:
            raise SpecError(
                top_options[0],
                "only applies to a catalogue model, not to a raw one"
                + f"; a raw model takes it in its mapping (model.{top_options[0]})",
            )
        name = _string(raw.get("name", "custom"), "model.name")
        return None, ModelSpec(
            name,
            _count(raw, "num_blocks", "model", limits.MAX_BLOCKS),
            _number(raw, "block_size_gb", "model", MEMORY),
            _number(raw, "cache_size_gb", "model", MEMORY),
            max_tokens=_max_tokens(raw, "model"),
            dtype=_raw_dtype(raw, "model"),
        )
    # where each option comes from: the top level or the model mapping
    source: dict[str, tuple[Mapping[str, Any], str]] = {k: (data, "") for k in top_options}
    if isinstance(raw, Mapping):
        _check_keys(raw, "model", ("name", "dtype", "max_tokens"), required=("name",))
        for key in ("dtype", "max_tokens"):
            if key in raw and key in source:
                raise SpecError(f"model.{key}", "given both here and at the top level")
            if key in raw:
                source[key] = (raw, "model")
        name_path, name = "model.name", raw["name"]
    else:
        name_path, name = "model", raw
        if resolve_model is not None and _catalogue_error(_string(name, name_path)) is not None:
            return None, _named_model(data, name, workload, resolve_model, base_dir)
    with _at(field=name_path):
        arch = catalogue.model_arch(_string(name, name_path))
    dtype = None
    if "dtype" in source:
        where, path = source["dtype"]
        dtype = _string(where["dtype"], _join(path, "dtype"))
        if dtype not in catalogue.BITS_PER_PARAM:
            raise SpecError(
                _join(path, "dtype"), f"unknown dtype {dtype!r}; known: {', '.join(catalogue.BITS_PER_PARAM)}"
            )
    max_tokens = workload.prompt_tokens + workload.output_tokens
    if "max_tokens" in source:
        max_tokens = _count(source["max_tokens"][0], "max_tokens", source["max_tokens"][1], limits.MAX_TOKENS)
    return arch, arch.spec(dtype, max_tokens)


def _named_model(
    data: Mapping[str, Any], name: str, workload: Workload, resolve_model: ModelResolver, base_dir: Path | None
) -> ModelSpec:
    """``model: NAME`` that is no catalogue model: a model the runtime builds (``gemma3-270m``) or a
    directory, measured like ``{path: NAME}``; else the catalogue's error, with the runtime's reason."""
    try:
        return _path_model(data, {"path": name}, workload, resolve_model, base_dir)
    except SpecError as exc:
        reason = str(exc).removeprefix("model.path: ")
        raise SpecError("model", f"{_catalogue_error(name)}; nor a model to measure: {reason}") from None


def _catalogue_error(name: str) -> str | None:
    """Why ``name`` is no catalogue model (``None``: it is one)."""
    try:
        catalogue.model_arch(name)
    except SpecError as exc:
        return str(exc).removeprefix("model: ")
    return None


def _path_model(
    data: Mapping[str, Any],
    raw: Mapping[str, Any],
    workload: Workload,
    resolve_model: ModelResolver | None,
    base_dir: Path | None,
) -> ModelSpec:
    """``model: {path: DIR, dtype, max_tokens}``: the directory measured by ``resolve_model``."""
    _check_keys(raw, "model", PATH_MODEL_KEYS, required=("path",))
    options: dict[str, tuple[Mapping[str, Any], str]] = {}
    for key in ("dtype", "max_tokens"):
        if key in raw and key in data:
            raise SpecError(f"model.{key}", "given both here and at the top level")
        if key in raw or key in data:
            options[key] = (raw, "model") if key in raw else (data, "")
    dtype = "fp32"
    if "dtype" in options:
        where, path = options["dtype"]
        dtype = _string(where["dtype"], _join(path, "dtype"))
        if dtype not in PATH_DTYPES:
            raise SpecError(
                _join(path, "dtype"), f"a model given by its directory runs in {', '.join(PATH_DTYPES)}, not {dtype!r}"
            )
    max_tokens = workload.prompt_tokens + workload.output_tokens
    if "max_tokens" in options:
        max_tokens = _count(options["max_tokens"][0], "max_tokens", options["max_tokens"][1], limits.MAX_TOKENS)
    directory = Path(_string(raw["path"], "model.path")).expanduser()
    if not directory.is_absolute() and base_dir is not None and (base_dir / directory).exists():
        directory = base_dir / directory
    if resolve_model is None:
        raise SpecError(
            "model.path",
            "a model given by its directory is measured by the runtime (torch and transformers); "
            "this caller passed no resolve_model, so give the model by name or as raw sizes",
        )
    try:
        spec = resolve_model(directory, dtype, max_tokens)
    except SpecError:
        raise
    except ValueError as exc:  # also a missing torch extra: the line says what to install
        raise SpecError("model.path", str(exc).removeprefix("model: ")) from None
    limits.check_count("model.num_blocks", spec.num_blocks, limits.MAX_BLOCKS, "(measured from the directory)")
    return spec


def _entry_servers(
    raw: Any, path: str, arch: ModelArch | None, model: ModelSpec, workload: Workload
) -> tuple[Server, ...]:
    entry = _mapping(raw, path)
    _check_keys(entry, path, SERVER_KEYS)
    profile: GpuProfile | None = None
    if "gpu" in entry:
        with _at(field=f"{path}.gpu"):
            profile = catalogue.gpu_profile(_string(entry["gpu"], "gpu"))
    count = _count(entry, "count", path, limits.MAX_SERVERS) if "count" in entry else 1
    if "name" in entry:
        name = _string(entry["name"], f"{path}.name")
    elif profile is not None:
        name = profile.name
    else:
        raise SpecError(f"{path}.name", "required when no gpu is given")
    if "memory_gb" in entry:
        memory_gb: float = _number(entry, "memory_gb", path, MEMORY)
    elif profile is not None:
        memory_gb = profile.memory_gb
    else:
        raise SpecError(f"{path}.memory_gb", "required when no gpu is given")
    weights, sizes_gb = _weights(entry, path, model)
    block_gb = model.block_size_gb if sizes_gb is None else sizes_gb[0]
    step = None
    if "step_cost" in entry:
        step = _server_step_cost(entry["step_cost"], f"{path}.step_cost", profile, model, block_gb)
    tau_p = _seconds(entry, "tau_p", path)
    if tau_p is None and step is not None:
        tau_p = step.job_s(workload.prompt_tokens, workload.output_tokens)
        with _at(field=f"{path}.tau_p_s"):
            limits.check_range("tau_p_s", tau_p, limits.TIME_S, "s (one job at batch 1 from step_cost)")
    if tau_p is None:
        if profile is None or arch is None:
            raise SpecError(f"{path}.tau_p_s", "required unless both a gpu and a catalogue model are given")
        tau_p = catalogue.tau_p_s(profile, arch, block_gb, workload.prompt_tokens, workload.output_tokens)
        with _at(field=f"{path}.tau_p_s"):
            limits.check_range("tau_p_s", tau_p, limits.TIME_S, "s (derived from the gpu, model and tokens)")
    tau_c = _seconds(entry, "tau_c", path, allow_zero=True)
    rtts = _rtts(entry, path, count)
    if tau_c is None and rtts is None:
        raise SpecError(f"{path}.rtt_ms", "required unless tau_c_s (or tau_c_ms) is given")
    if tau_c is None and rtts is not None:
        for rtt in rtts:  # τ^c = (RTT + 18 ms) × output_tokens must stay a meaningful time
            with _at(field=f"{path}.rtt_ms"):
                limits.check_range(
                    "tau_c_s",
                    catalogue.tau_c_s(rtt, workload.output_tokens),
                    limits.TIME_S,
                    "s for the derived tau_c_s = (RTT + 18 ms) × output_tokens",
                )
    return replica_servers(
        name,
        count,
        memory_gb=memory_gb,
        tau_p_s=tau_p,
        rtts_s=rtts,
        tau_c_s=tau_c,
        round_trips=workload.output_tokens,
        gpu=profile.name if profile else None,
        step=step,
        weights=weights,
        sizes_gb=sizes_gb,
    )


def _format(entry: Mapping[str, Any], path: str) -> str | None:
    """A server entry's optional ``weights``, one of :data:`~.formats.WEIGHT_FORMATS`."""
    if "weights" not in entry:
        return None
    weights = _string(entry["weights"], f"{path}.weights")
    if weights not in WEIGHT_FORMATS:
        raise SpecError(f"{path}.weights", f"unknown weight format {weights!r}; known: {', '.join(WEIGHT_FORMATS)}")
    return weights


def _weights(entry: Mapping[str, Any], path: str, model: ModelSpec) -> tuple[str | None, tuple[float, float] | None]:
    """A server entry's ``weights`` and its (s_m,j, s_c,j) from the model (both ``None`` when absent)."""
    weights = _format(entry, path)
    if weights is None:
        return None, None
    with _at(field=f"{path}.weights"):
        return weights, model.sizes_for(weights)


def _raw_server_sizes(
    entry: Mapping[str, Any], path: str, model: ModelSpec
) -> tuple[str | None, float | None, float | None]:
    """A raw server's ``weights``, s_m,j and s_c,j: its own sizes where given, else the model's in
    ``weights`` (``None``: the model's)."""
    given = {key: _number(entry, key, path, MEMORY) for key in ("block_size_gb", "cache_size_gb") if key in entry}
    weights = _format(entry, path)
    if weights is not None and len(given) < 2:
        with _at(field=f"{path}.weights"):
            block_gb, cache_gb = model.sizes_for(weights)
        given = {"block_size_gb": block_gb, "cache_size_gb": cache_gb, **given}
    return weights, given.get("block_size_gb"), given.get("cache_size_gb")


def _server_step_cost(
    raw: Any, path: str, profile: GpuProfile | None, model: ModelSpec, block_size_gb: float
) -> StepCost:
    """A server's ``step_cost``: ``roofline`` (gpu and catalogue model, its blocks of
    ``block_size_gb``) or the coefficients."""
    if raw != "roofline":
        return _step_cost(raw, path, STEP_COST_STEMS)
    if profile is None or model.flops_per_token_per_block is None:
        raise SpecError(path, "roofline needs a gpu and a catalogue model (its FLOPs per token)")
    return catalogue.roofline_step_cost(profile, block_size_gb, model.flops_per_token_per_block)


def _step_cost(raw: Any, path: str, stems: Sequence[str]) -> StepCost:
    """Coefficients ``<stem>_s`` / ``<stem>_ms`` (prefill ones default to the decode ones) and ``r2``."""
    if isinstance(raw, str):
        raise SpecError(path, f"expected a mapping of {', '.join(f'{s}_ms' for s in stems)} or 'roofline', got {raw!r}")
    entry = _mapping(raw, path)
    _check_keys(entry, path, [f"{stem}{unit}" for stem in stems for unit in ("_s", "_ms")] + ["r2"])
    alpha, beta = (_seconds(entry, stem, path, allow_zero=True) for stem in ("alpha", "beta"))
    if alpha is None or beta is None:
        raise SpecError(f"{path}.alpha_ms", "alpha and beta are required (alpha_ms, beta_ms or their _s)")
    prefill = [_seconds(entry, stem, path, allow_zero=True) for stem in ("prefill_alpha", "prefill_beta")]
    r2 = _number(entry, "r2", path, ((1e-9, 1.0), ""), allow_zero=True) if "r2" in entry else None
    try:
        return StepCost(alpha, beta, alpha if prefill[0] is None else prefill[0],
                        beta if prefill[1] is None else prefill[1], r2)  # fmt: skip
    except ValueError as exc:
        raise SpecError(path, str(exc)) from None


def _rtts(entry: Mapping[str, Any], path: str, count: int) -> list[float] | None:
    """RTTs in seconds, one per server of the entry, from ``rtt_ms`` or ``rtt_s``."""
    keys = [k for k in ("rtt_ms", "rtt_s") if k in entry]
    if not keys:
        return None
    if len(keys) > 1:
        raise SpecError(f"{path}.rtt_ms", "give rtt_ms or rtt_s, not both")
    key = keys[0]
    per_s = 1000 if key == "rtt_ms" else 1  # divide, not × 1e-3: 26.0 ms → the same float as presets
    value = entry[key]
    if not isinstance(value, list):
        return [_number(entry, key, path, _time_bounds(per_s), allow_zero=True) / per_s] * count
    if len(value) != count:
        raise SpecError(f"{path}.{key}", f"expected {count} values (one per server), got {len(value)}")
    items = dict(enumerate(value))
    return [_number(items, i, f"{path}.{key}", _time_bounds(per_s), allow_zero=True) / per_s for i in range(count)]


def _time_bounds(per_s: int) -> tuple[tuple[float, float], str]:
    """The time range (and unit) in the unit of a ``*_s`` (``per_s`` 1) or ``*_ms`` (1000) field."""
    return (limits.TIME_S[0] * per_s, limits.TIME_S[1] * per_s), "ms" if per_s == 1000 else "s"


def _seconds(entry: Mapping[str, Any], stem: str, path: str, allow_zero: bool = False) -> float | None:
    """``<stem>_s`` or ``<stem>_ms`` (not both) in seconds, or ``None`` when neither is given."""
    if f"{stem}_s" in entry and f"{stem}_ms" in entry:
        raise SpecError(f"{path}.{stem}_s", f"give {stem}_s or {stem}_ms, not both")
    if f"{stem}_s" in entry:
        return _number(entry, f"{stem}_s", path, _time_bounds(1), allow_zero=allow_zero)
    if f"{stem}_ms" in entry:
        return _number(entry, f"{stem}_ms", path, _time_bounds(1000), allow_zero=allow_zero) / 1000
    return None


def _raw_problem(data: Mapping[str, Any], default_name: str) -> Problem:
    _check_keys(data, "", RAW_KEYS, required=RAW_REQUIRED)
    name = _string(data.get("name", default_name), "name")
    model = ModelSpec(
        name,
        _count(data, "num_blocks", "", limits.MAX_BLOCKS),
        _number(data, "block_size_gb", "", MEMORY),
        _number(data, "cache_size_gb", "", MEMORY),
        max_tokens=_max_tokens(data, ""),
        dtype=_raw_dtype(data, ""),
    )
    workload = _workload({k: data[k] for k in WORKLOAD_KEYS if k in data}, "")
    servers = []
    entries = _list(data["servers"], "servers")
    if len(entries) > limits.MAX_SERVERS:
        raise SpecError(
            "servers", f"at most {limits.MAX_SERVERS} servers (the planner's limit on J), got {len(entries)}"
        )
    for i, raw in enumerate(entries):
        path = f"servers[{i}]"
        entry = _mapping(raw, path)
        _check_keys(entry, path, RAW_SERVER_KEYS + RAW_SERVER_OPTIONAL, required=RAW_SERVER_KEYS)
        server_id = entry["server_id"]
        if isinstance(server_id, bool) or not isinstance(server_id, int | str):
            raise SpecError(f"{path}.server_id", f"must be an integer or a string, got {server_id!r}")
        weights, block_gb, cache_gb = _raw_server_sizes(entry, path, model)
        servers.append(
            Server(
                str(server_id),
                _number(entry, "memory_gb", path, MEMORY),
                _number(entry, "tau_p", path, _time_bounds(1)),
                _number(entry, "tau_c", path, _time_bounds(1), allow_zero=True),
                weights=weights,
                block_size_gb=block_gb,
                cache_size_gb=cache_gb,
            )
        )
    return Problem(
        tuple(servers),
        model,
        workload,
        name,
        bprr_sessions=_bprr_sessions(data),
        load_bandwidth_gb_per_s=_load_bandwidth(data),
    )


def _max_tokens(data: Mapping[str, Any], path: str) -> int | None:
    """A raw model's optional ``max_tokens``: the sequence length ``cache_size_gb`` was sized for."""
    return _count(data, "max_tokens", path, limits.MAX_TOKENS) if "max_tokens" in data else None


def _raw_dtype(data: Mapping[str, Any], path: str) -> str | None:
    """A raw model's optional ``dtype``: the format its sizes are in (a server's ``weights`` scales from it)."""
    if "dtype" not in data:
        return None
    dtype = _string(data["dtype"], _join(path, "dtype"))
    if dtype not in catalogue.BITS_PER_PARAM:
        raise SpecError(_join(path, "dtype"), f"unknown dtype {dtype!r}; known: {', '.join(catalogue.BITS_PER_PARAM)}")
    return dtype


def _bprr_sessions(data: Mapping[str, Any]) -> int | None:
    """The optional ``bprr_sessions`` field: BPRR's R (sessions per block), fixed by the file."""
    return _count(data, "bprr_sessions", "") if "bprr_sessions" in data else None


def _load_bandwidth(data: Mapping[str, Any]) -> float:
    """The optional ``load_bandwidth_gb_per_s`` field (default :data:`DEFAULT_LOAD_BANDWIDTH_GB_PER_S`)."""
    if "load_bandwidth_gb_per_s" not in data:
        return DEFAULT_LOAD_BANDWIDTH_GB_PER_S
    return _number(data, "load_bandwidth_gb_per_s", "", LOAD_BANDWIDTH)


# --- field helpers --------------------------------------------------------------------------------


@contextmanager
def _at(prefix: str = "", field: str | None = None) -> Iterator[None]:
    """Re-raise a :class:`SpecError` from a catalogue or constructor under its path in the file:
    ``field`` replaces the error's field, else ``prefix`` goes in front of it."""
    try:
        yield
    except SpecError as exc:
        message = str(exc).removeprefix(f"{exc.field}: ")
        raise SpecError(field or _join(prefix, exc.field), message) from None


def _join(path: str, key: object) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _check_keys(data: Mapping[str, Any], path: str, allowed: Sequence[str], required: Sequence[str] = ()) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; expected one of: {', '.join(allowed)}"
            raise SpecError(_join(path, str(key)), f"unknown key{hint}")
    for key in required:
        if key not in data:
            raise SpecError(_join(path, key), "missing")


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(path, f"must be a mapping of keys to values, got {type(value).__name__}")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise SpecError(path, "must be a non-empty list")
    return value


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(path, f"must be a non-empty string, got {value!r}")
    return value


def _number(
    data: Mapping[Any, Any], key: object, path: str, bounds: tuple[tuple[float, float], str], allow_zero: bool = False
) -> float:
    """``data[key]`` as a number in ``bounds`` (a range and its unit, :mod:`~chainserve.model.limits`),
    or 0 with ``allow_zero``; errors name ``path.key``."""
    value, where = data[key], _join(path, key)
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            pass
        else:  # PyYAML reads 1e-3 (no dot) as text
            raise SpecError(where, f"must be a number, got the text {value!r} (write it as e.g. 1.0e-3)")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(where, f"must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise SpecError(where, f"must be {'non-negative' if allow_zero else 'positive'}, got {value!r}")
    return limits.check_range(where, value, bounds[0], bounds[1], allow_zero=allow_zero)


def _count(data: Mapping[str, Any], key: str, path: str, high: int | None = None) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(_join(path, key), f"must be a positive integer, got {value!r}")
    return value if high is None else limits.check_count(_join(path, key), value, high)


RATE = (limits.RATE_PER_S, "requests/s")
RHO = (limits.RHO_BAR, "(below 1: a design load of 1 or more plans for an unstable queue)")
MEMORY = (limits.MEMORY_GB, "GB")
#: Weight-loading bandwidth: from a slow network share to well past any PCIe/NVLink link.
LOAD_BANDWIDTH = ((1e-3, 1e4), "GB/s")
CORES = ((1e-3, 1e5), "cores")
