"""``chainserve stop``: end block servers that outlive their orchestrator (``serve --detach-servers``,
servers started by hand, issue 21) with an authenticated ``shutdown`` to each."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from chainserve.cli.block_server_cmd import read_secret
from chainserve.cli.common import fail, user_errors
from chainserve.model.spec import SpecError


def stop(
    servers: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME=HOST:PORT", help="The block servers to stop; repeat or comma-separate."),
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="Or every block server of the orchestrator serving at this URL (its /status).")
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="The servers' shared secret (default: $CHAINSERVE_TOKEN).")
    ] = None,
) -> None:
    """Stop block servers: each finishes what it computes and exits, its port freed."""
    from chainserve.cli.serve_cmd import parse_pairs
    from chainserve.runtime.client import stop_servers

    with user_errors():
        if (servers is None) == (url is None):
            raise SpecError("servers", "give --servers or --url (one of them)")
        if url is not None:
            import httpx

            rows = httpx.get(url.rstrip("/") + "/status", timeout=10).json()["servers"]
            endpoints = {r["name"]: r["endpoint"] for r in rows}
        else:
            endpoints = parse_pairs(servers, "servers", number=False)
        token = read_secret(token_file, "CHAINSERVE_TOKEN") or ""
    failed = asyncio.run(stop_servers(endpoints, token))
    for name in endpoints:
        typer.echo(f"{name}: {failed[name] if name in failed else 'stopped'}")
    if failed:
        raise fail(f"{len(failed)} of {len(endpoints)} block servers did not confirm the shutdown")
