"""``chainserve serve``: plan a cluster, start its block servers, serve the OpenAI API (paper §4.2)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from chainserve.cli.block_server_cmd import read_secret, setup_logging
from chainserve.cli.common import PlannerOption, fail, user_errors
from chainserve.methods import METHODS
from chainserve.model.spec import SpecError
from chainserve.runtime.batching import DEFAULT_MAX_BATCH_TOKENS


def parse_pairs(values: list[str] | None, option: str, number: bool = True) -> dict:
    """``["s1=2.0", "s2=1.5"]`` → ``{"s1": 2.0, "s2": 1.5}`` (values as strings when not ``number``)."""
    pairs: dict = {}
    for item in values or []:
        for part in item.split(","):
            name, sep, value = part.partition("=")
            if not sep or not name.strip():
                raise SpecError(option, f"expected NAME=VALUE, got {part!r}")
            try:
                pairs[name.strip()] = float(value) if number else value.strip()
            except ValueError:
                raise SpecError(option, f"{name}: not a number: {value!r}") from None
    return pairs


def serve(
    cluster: Annotated[
        Path | None, typer.Argument(metavar="[CLUSTER]", help="Cluster file (YAML or raw JSON) to plan and serve.")
    ] = None,
    plan: Annotated[
        Path | None,
        typer.Option(help="A saved plan (chainserve plan --json output) instead of a cluster file (default: none)."),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            metavar="torch|emulated", help="torch: real weights; emulated: steps sleep the servers' profiled τ^p, τ^c."
        ),
    ] = "emulated",
    model: Annotated[
        str | None,
        typer.Option(
            metavar="NAME|PATH",
            help="torch backend: smollm2-135m, tiny-random, or a local Hugging Face directory (default: none).",
        ),
    ] = None,
    method: Annotated[str, typer.Option(help=f"{', '.join(METHODS)}, or proposed:<policy>.")] = "proposed",
    launcher: Annotated[str, typer.Option(metavar="local|ray", help="Where block servers run.")] = "local",
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (with --launcher ray) (default: none: start a local Ray).")
    ] = None,
    servers: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME=HOST:PORT",
            help="Block servers started by hand (chainserve block-server --plan …); "
            "one per placed server, repeat or comma-separate.",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address of the HTTP API.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the HTTP API (0: any free port).")] = 8000,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            help="KV positions of one block-slot, the job length the plan sized its cache for (a job reserves "
            "pages for its own prompt + output); default the model spec's max_tokens, else 2048."
        ),
    ] = None,
    max_context: Annotated[
        int | None,
        typer.Option(help="The longest request served, prompt + output (default: the model's window)."),
    ] = None,
    slowdown: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME=X",
            help="Stretch a server's compute X-fold (heterogeneity on one host) (default: 1 for every server).",
        ),
    ] = None,
    delay_ms: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME=MS", help="Extra one-way network delay of a server, in ms (default: 0 for every server)."
        ),
    ] = None,
    device: Annotated[
        list[str] | None,
        typer.Option(
            metavar="DEVICE|NAME=DEVICE",
            help="torch backend: auto, cpu, cuda or cuda:N for the head and every block server (auto: a GPU each "
            "while there are several, else CUDA if any, else CPU); NAME=DEVICE for one server (default: auto).",
        ),
    ] = None,
    max_batch_tokens: Annotated[
        int,
        typer.Option(help="torch backend: tokens a block server's batched iteration computes at most."),
    ] = DEFAULT_MAX_BATCH_TOKENS,
    threads: Annotated[
        int,
        typer.Option(
            min=1, help="torch backend: CPU threads of every block server it starts (1 where they share cores)."
        ),
    ] = 1,
    max_waiting: Annotated[
        int | None,
        typer.Option(help="Bound of the central queue; past it HTTP 429 (default 4 × C, the jobs all chains hold)."),
    ] = None,
    request_timeout_s: Annotated[
        float, typer.Option(help="End a request not finished after this many seconds (HTTP 504).")
    ] = 600.0,
    heartbeat_s: Annotated[
        float, typer.Option(help="Ask every block server for a heartbeat every this many seconds.")
    ] = 0.5,
    heartbeat_deadline_s: Annotated[
        float, typer.Option(help="A server that misses a heartbeat's reply for this many seconds is marked dead.")
    ] = 2.0,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require 'Authorization: Bearer KEY' on /v1/* (default: none: open).", envvar="CHAINSERVE_API_KEY"
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="Secret shared with the block servers (default: $CHAINSERVE_TOKEN, else a fresh one)."),
    ] = None,
    log_dir: Annotated[
        Path | None, typer.Option(help="Block server logs (default: a temporary folder, removed at exit).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of randomised placements (PETALS).")] = 0,
    planner: PlannerOption = "best",
    adapt: Annotated[
        bool,
        typer.Option(
            "--adapt",
            help="Re-plan for the measured request rate (proposed method, local launcher): chains or spans "
            "change without dropping a request; changes at /plan and in /metrics.",
        ),
    ] = False,
    adapt_window_s: Annotated[
        float, typer.Option(help="With --adapt: seconds per arrival-count window of the change detector.")
    ] = 10.0,
    adapt_min_dwell_s: Annotated[
        float, typer.Option(help="With --adapt: no plan change within this many seconds of the last.")
    ] = 120.0,
    adapt_horizon_s: Annotated[
        float, typer.Option(help="With --adapt: seconds a new plan is expected to stay (weighs gain vs cost).")
    ] = 1800.0,
    detach_servers: Annotated[
        bool,
        typer.Option(
            "--detach-servers",
            help="Local launcher: block servers outlive this process (a new orchestrator attaches to them; "
            "chainserve stop ends them).",
        ),
    ] = False,
    standby_of: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="Stand by for the orchestrator at URL (503 meanwhile) and take its block servers over when it "
            "stops answering (no CLUSTER, --plan or --servers) (default: none).",
        ),
    ] = None,
    standby_deadline_s: Annotated[
        float, typer.Option(help="With --standby-of: take over after this many seconds without an answer.")
    ] = 1.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Plan a cluster, start its block servers and serve an OpenAI-compatible API."""
    from chainserve.adapt.controller import AdaptConfig
    from chainserve.runtime.service import ServeConfig
    from chainserve.runtime.service import serve as run

    setup_logging(log_level)
    with user_errors():
        adapt_config = (
            AdaptConfig(
                window_s=adapt_window_s, min_dwell_s=adapt_min_dwell_s, horizon_s=adapt_horizon_s, planner=planner
            )
            if adapt
            else None
        )
        config = ServeConfig(
            cluster,
            plan,
            backend,
            model,
            method,
            launcher,
            address,
            parse_pairs(servers, "servers", number=False),
            host,
            port,
            max_tokens,
            parse_pairs(slowdown, "slowdown"),
            parse_pairs(delay_ms, "delay_ms"),
            seed,
            max_waiting,
            api_key,
            read_secret(token_file, "CHAINSERVE_TOKEN"),
            log_dir,
            request_timeout_s,
            heartbeat_s,
            heartbeat_deadline_s,
            planner=planner,
            adapt=adapt_config,
            device=next((d for d in device or [] if "=" not in d), "auto"),
            devices=parse_pairs([d for d in device or [] if "=" in d], "device", number=False),
            max_batch_tokens=max_batch_tokens,
            threads=threads,
            detach_servers=detach_servers,
            standby_of=standby_of.rstrip("/") if standby_of else None,
            standby_deadline_s=standby_deadline_s,
            max_context=max_context,
        )

    def ready(url: str, service) -> None:
        if service is None:
            typer.echo(f"chainserve: standing by for {standby_of} on {url}")
            return
        typer.echo(
            f"chainserve: serving {service.orchestrator.model_id} on {url} "
            f"(method {service.orchestrator.method}, {len(service.specs)} block servers, "
            f"logs in {service.log_dir})"
        )

    try:
        asyncio.run(run(config, ready))
    except (ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        pass
