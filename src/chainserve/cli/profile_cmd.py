"""``chainserve profile``: measure live block servers' τ^p and τ^c (paper §4.2) and their batched step
cost (issue 18: ``step_cost`` per server, ``head_cost`` of the torch LM head) and write a cluster file."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from chainserve.cli.common import check_out_folder, stderr_console, stdout_console, user_errors
from chainserve.model.spec import Problem, SpecError


def _check_out(path: Path) -> Path:
    """``--out`` names a file in a writable folder (created if need be; checked before any work)."""
    if path.is_dir():
        raise SpecError("out", f"{path} is a folder; give a file name such as {path / 'profiled.yaml'}")
    check_out_folder("out", path.parent)
    return path


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def _table(problem: Problem, profiles: dict) -> Table:
    from chainserve.measure.profile import relative_error

    configured = {s.name: s for s in problem.servers}
    tokens = ", ".join(sorted({str(p.prompt_len) for p in profiles.values()}))
    table = Table(
        title="Profile: step time = a + b·m over m blocks run (Theil–Sen fits)",
        caption=f"b: compute per block per prompt token (prefills of {tokens} tokens) or per output token "
        "(decode steps); a: a decode step without blocks; file: the served cluster's τ",
    )
    headers = ("server", "blocks run", "prefill b µs/tok", "R²", "decode b ms/tok", "R²", "a ms", "ping ms")
    for header in (*headers, "τ^p s", "file τ^p s", "Δτ^p", "τ^c s", "file τ^c s"):
        table.add_column(header, justify="left" if header == "server" else "right")
    for name, p in profiles.items():
        s = configured[name]
        error = relative_error(p.tau_p_s, s.tau_p_s)
        table.add_row(
            name,
            ",".join(map(str, p.counts)) if len(p.counts) < 6 else f"{p.counts[0]}..{p.counts[-1]} ({len(p.counts)})",
            f"{p.prefill.slope_s / p.prompt_len * 1e6:.3g}",
            f"{p.prefill.r2:.3f}",
            _ms(p.decode.slope_s),
            f"{p.decode.r2:.3f}",
            _ms(p.decode.intercept_s),
            _ms(p.ping_s),
            f"{p.tau_p_s:.4g}",
            f"{s.tau_p_s:.4g}",
            "–" if math.isnan(error) else f"{error * 100:+.1f} %",
            f"{p.tau_c_s:.4g}",
            f"{s.tau_c_s:.4g}",
        )
    return table


def _step_table(profiles: dict, head_cost) -> Table:
    """The step-cost fits (issue 18): per block, decode α + β·b, prefill α' + β'·q, and their R²."""
    table = Table(
        title="Step cost per block (least squares): decode α + β·b sessions, prefill α' + β'·q tokens",
        caption="c0: transport per message (not in the cost); R²: the worse of the two fits"
        + (
            f"; head: {head_cost.alpha_s * 1000:.3g} + {head_cost.beta_s * 1000:.3g}·n ms"
            if head_cost is not None
            else ""
        ),
    )
    for header in ("server", "α ms", "β ms", "α' ms", "β' µs/tok", "c0 ms", "R²"):
        table.add_column(header, justify="left" if header == "server" else "right")
    for name, p in profiles.items():
        if p.step_fit is None:
            continue
        cost, fit = p.step, p.step_fit
        table.add_row(
            name,
            f"{cost.alpha_s * 1000:.3g}",
            f"{cost.beta_s * 1000:.3g}",
            f"{cost.prefill_alpha_s * 1000:.3g}",
            f"{cost.prefill_beta_s * 1e6:.3g}",
            f"{fit.decode.overhead_s * 1000:.3g}",
            f"{cost.r2:.3f}",
        )
    return table


def profile(
    cluster: Annotated[
        Path | None,
        typer.Argument(metavar="[CLUSTER]", help="Cluster file whose block servers to start, profile and stop."),
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="A running chainserve serve to profile (its /plan and /status) (default: none).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Cluster file (YAML) to write with the measured τ^p, τ^c.")] = ...,  # type: ignore[assignment]
    token_file: Annotated[
        Path | None,
        typer.Option(help="With --url: the secret serve shares with its block servers (default: $CHAINSERVE_TOKEN)."),
    ] = None,
    backend: Annotated[
        str, typer.Option(metavar="torch|emulated", help="With CLUSTER: the block servers' backend.")
    ] = "emulated",
    model: Annotated[
        str | None,
        typer.Option(
            metavar="NAME|PATH",
            help="torch backend: tiny-random, smollm2-135m or a local directory (with --url default: the servers').",
        ),
    ] = None,
    prompt_tokens: Annotated[
        int | None, typer.Option(help="l_in the τ are for \\[default: the cluster's workload]")
    ] = None,
    output_tokens: Annotated[
        int | None, typer.Option(help="l_out the τ are for \\[default: the cluster's workload]")
    ] = None,
    decode_steps: Annotated[int, typer.Option(help="Decode steps timed per session.")] = 4,
    repeats: Annotated[int, typer.Option(help="Sessions per block count and server.")] = 4,
    warmup: Annotated[int, typer.Option(help="Discarded sessions per server first.")] = 2,
    counts: Annotated[int, typer.Option("--counts", help="Block counts tried per server (at most).")] = 6,
    parallel: Annotated[
        bool,
        typer.Option(
            "--parallel", help="Profile all servers at once (only when they do not share CPUs, e.g. emulated)."
        ),
    ] = False,
    slowdown: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME=X", help="With CLUSTER: stretch a server's compute X-fold (default: none)."),
    ] = None,
    delay_ms: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME=MS", help="With CLUSTER: extra one-way delay of a server in ms (default: none)."),
    ] = None,
    max_batch: Annotated[
        int, typer.Option(help="Largest decode batch of the step-cost profile (issue 18); 0: τ only.")
    ] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the sessions' order.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar on stderr.")] = False,
) -> None:
    """Measure each live block server's τ^p (per block) and τ^c (per job) and write a cluster file."""
    from chainserve import progress
    from chainserve.cli.block_server_cmd import read_secret
    from chainserve.cli.serve_cmd import parse_pairs
    from chainserve.extras import require
    from chainserve.measure import profile_live
    from chainserve.measure.profile import ProfileSettings, cluster_yaml, cpu_hosts, ranks_agree
    from chainserve.measure.profile_batch import measure_head, served_backend
    from chainserve.model.cluster_file import load_cluster
    from chainserve.runtime.models import measured_model, torch_model_for

    progress.SHOW_PROGRESS = not quiet
    with user_errors():
        if (cluster is None) == (url is None):
            raise SpecError("cluster", "give a cluster file or --url (one of them)")
        if url is not None and (slowdown or delay_ms):
            raise SpecError(
                "slowdown" if slowdown else "delay-ms", "applies to a CLUSTER the command starts, not --url"
            )
        _check_out(out)
        if backend == "torch" and url is None:
            require("torch", "the torch backend")
        served = profile_live.served_cluster(url) if url is not None else None
        problem = served.problem if served is not None else load_cluster(cluster, measured_model)
        if backend == "torch" and served is None:  # the cluster's own model when --model is absent
            model = torch_model_for(problem.model, model)
        w = problem.workload
        settings = ProfileSettings(
            prompt_tokens or w.prompt_tokens,
            output_tokens or w.output_tokens,
            decode_steps,
            repeats,
            warmup,
            counts,
            parallel,
            seed,
            max_batch,
        )
        if served is not None:
            token = read_secret(token_file, "CHAINSERVE_TOKEN") or ""
            if served.num_running:
                stderr_console().print(f"warning: {served.num_running} requests running: the profile will be noisy")
            profiles = asyncio.run(profile_live.measure_servers(served.endpoints, token, settings, model))
            source = url
            backend, model = asyncio.run(served_backend(served.endpoints, token, model))
        else:
            delays = {name: ms / 1000 for name, ms in parse_pairs(delay_ms, "delay-ms").items()}
            profiles = asyncio.run(
                profile_live.profile_cluster(
                    problem, backend, model, settings, parse_pairs(slowdown, "slowdown"), delays
                )
            )
            source = f"{cluster}, {backend} backend"
            if backend == "torch":  # on the CPU they computed on this machine's cores, as they will served here
                problem = replace(problem, hosts=cpu_hosts(problem))
        head_cost = measure_head(backend, model) if max_batch else None
        out.write_text(cluster_yaml(problem, profiles, settings, source, head_cost), encoding="utf-8")
    console = stdout_console()
    console.print(_table(problem, profiles))
    if any(p.step_fit is not None for p in profiles.values()):
        console.print(_step_table(profiles, head_cost))
    configured = {s.name: s.tau_p_s for s in problem.servers}
    agree = ranks_agree({n: p.tau_p_s for n, p in profiles.items()}, configured)
    console.print(f"ranking by τ^p: {'the same as' if agree else 'differs from'} the cluster file's")
    console.print(f"wrote {out}")
