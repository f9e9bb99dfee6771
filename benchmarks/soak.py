"""Soak: mixed load on a live emulated cluster while block servers and orchestrators are killed and
malformed requests arrive; nothing may be lost (the reliability issues' soak, ≤ 10 minutes).

Starts ``chainserve serve --detach-servers`` on the 6-server emulated test cluster (as a user would)
and a standby orchestrator for it (``serve --standby-of``), both behind a health-checked balancer
(:mod:`chainserve.measure.balancer`), then for ``--minutes``: completions of random lengths from
several clients with the official ``openai`` client (non-streamed, its default retries), some of which
hang up early (cancellations); a malformed request every second (each must get a 4xx); every
``--fault-every`` seconds a random block server gets SIGKILL and is restarted by hand (same id and
port, from the saved plan) a few seconds later; every ``--orchestrator-every`` seconds the active
orchestrator gets SIGKILL, the standby takes over and a new standby is started for it. Every
completed answer is checked against the emulated model's greedy text; lost counts what a client saw
fail.

``--cluster single-chain`` (issue 33) serves a cluster of ONE chain a → b → c instead (the block
servers are the orchestrator's children, no standby): every ``--fault-every`` seconds a random block
server gets SIGKILL and nobody restarts it by hand: its launcher must. While no chain exists, requests
get 503 (``Retry-After``); a client retries each 503 up to 3 times after the time it is told. Every
HTTP attempt must be answered within ``--unavailable-wait-s`` + 30 s, else it counts as hung; lost
counts answers with the wrong text and errors other than a 503.

    python benchmarks/soak.py                 # 3 minutes
    python benchmarks/soak.py --minutes 9 --orchestrator-every 45
    python benchmarks/soak.py --cluster single-chain --minutes 3 --fault-every 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from chainserve.measure.balancer import Balancer
from chainserve.runtime.backends.emulated import EmulatedHead
from chainserve.runtime.client import server_pid as block_server_pid
from chainserve.runtime.client import stop_servers

TEST_DATA = Path(__file__).resolve().parents[1] / "tests" / "runtime" / "data"
CLUSTER = TEST_DATA / "emulated-6.yaml"
SINGLE_CHAIN = TEST_DATA / "emulated-chain-3.yaml"
UNAVAILABLE_WAIT_S = 30.0
PROMPTS = [
    "the chain serves the model",
    "a fast server holds the cache",
    "we wait in the queue",
    "light on the river",
    "the plan came back",
    "many people work here",
]
BAD_BODIES = [
    {"prompt": "x", "max_tokens": -3},
    {"prompt": 7},
    {"prompt": "x", "max_tokens": 10**9},
    {"prompt": "x", "temperature": "hot"},
    {"prompt": "x", "bogus": 1},
    {"prompt": ""},
    "not json {",
]


def start_serve(workdir: Path, name: str, *args: str) -> tuple[subprocess.Popen, str]:
    """``chainserve serve ARGS`` (an active orchestrator or a standby) and its URL once ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "chainserve", "serve", *args, "--port", "0", "--token-file", str(workdir / "token"),
         "--log-dir", str(workdir / name), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=open(workdir / f"{name}.err", "wb"), text=True,
    )  # fmt: skip
    for line in proc.stdout:
        match = re.search(r"on (http://\S+)", line)
        if match:
            return proc, match.group(1)
    raise SystemExit(f"chainserve serve ({name}) did not start: " + (workdir / f"{name}.err").read_text()[-2000:])


async def complete(oai: openai.AsyncOpenAI, prompt: str, max_tokens: int, patience_s: float | None):
    """One greedy completion; ``TimeoutError`` after ``patience_s`` (``None``: none)."""
    create = oai.completions.create(model="emulated/toy", prompt=prompt, max_tokens=max_tokens, temperature=0)
    return await asyncio.wait_for(create, patience_s)


def check(counts: dict, head: EmulatedHead, prompt: str, max_tokens: int, answer) -> None:
    """Count an answer: completed (and resumed), or lost with the wrong text."""
    if answer.choices[0].text != head.greedy_text(prompt, max_tokens):
        counts["wrong_text"] += 1
        counts["lost"] += 1
    else:
        counts["completed"] += 1
        counts["resumed"] += answer.model_extra["chainserve"]["num_attempts"] > 1


async def soak(minutes: float, fault_every_s: float, orchestrator_every_s: float, clients: int, seed: int) -> dict:
    rng = random.Random(seed)
    head = EmulatedHead("toy", 8, 4096)
    workdir = Path(tempfile.mkdtemp(prefix="chainserve-soak-"))
    (workdir / "token").write_text(os.urandom(8).hex())
    orchestrators = [start_serve(workdir, "o0", str(CLUSTER), "--planner", "greedy", "--detach-servers")]
    orchestrators.append(start_serve(workdir, "o1", "--standby-of", orchestrators[0][1]))
    balancer = Balancer([url for _, url in orchestrators])
    url = balancer.url
    counts = {
        "sent": 0,
        "completed": 0,
        "resumed": 0,
        "cancelled_by_client": 0,
        "lost": 0,
        "wrong_text": 0,
        "bad_inputs_sent": 0,
        "bad_inputs_rejected": 0,
        "kills": 0,
        "restarts": 0,
        "orchestrator_kills": 0,
        "errors": {},  # what the lost requests got, by exception and status
    }
    deadline = time.monotonic() + minutes * 60
    endpoints: dict[str, str] = {}
    try:
        async with httpx.AsyncClient(base_url=orchestrators[0][1], timeout=300) as http:
            plan = (await http.get("/plan")).json()
            (workdir / "plan.json").write_text(json.dumps(plan))
            status = (await http.get("/status")).json()
        endpoints = {s["name"]: s["endpoint"] for s in status["servers"]}
        ports = {name: endpoint.rsplit(":", 1)[1] for name, endpoint in endpoints.items()}
        oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=300)
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:

            async def client() -> None:
                while time.monotonic() < deadline:
                    prompt, max_tokens = rng.choice(PROMPTS), rng.randint(4, 40)
                    counts["sent"] += 1
                    patience = 0.2 if rng.random() < 0.1 else None  # some clients hang up after a moment
                    try:
                        answer = await complete(oai, prompt, max_tokens, patience)
                    except TimeoutError:
                        counts["cancelled_by_client"] += 1
                        continue
                    except openai.OpenAIError as exc:
                        counts["lost"] += 1
                        why = f"{type(exc).__name__} {getattr(exc, 'status_code', '')}".strip()
                        counts["errors"][why] = counts["errors"].get(why, 0) + 1
                        continue
                    check(counts, head, prompt, max_tokens, answer)

            async def bad_inputs() -> None:
                while time.monotonic() < deadline:
                    body = rng.choice(BAD_BODIES)
                    kwargs = (
                        {"content": body, "headers": {"content-type": "application/json"}}
                        if isinstance(body, str)
                        else {"json": body}
                    )
                    response = await http.post("/v1/completions", **kwargs)
                    if response.status_code != 503:  # no orchestrator for a moment: not an answer
                        counts["bad_inputs_sent"] += 1
                        counts["bad_inputs_rejected"] += 400 <= response.status_code < 500
                    await asyncio.sleep(1.0)

            async def faults() -> None:
                while time.monotonic() + fault_every_s < deadline:
                    await asyncio.sleep(fault_every_s)
                    while (status := await http.get("/status")).status_code != 200:  # a takeover under way
                        await asyncio.sleep(0.2)
                    infos = status.json()["servers"]
                    victim = rng.choice([s["name"] for s in infos if s["alive"]])
                    pid = await server_pid(workdir, victim, endpoints[victim])
                    os.kill(pid, signal.SIGKILL)
                    counts["kills"] += 1
                    print(f"  killed block server {victim}", flush=True)
                    await asyncio.sleep(rng.uniform(2, 6))
                    restart(workdir, victim, ports[victim])
                    counts["restarts"] += 1
                    print(f"  restarted {victim}", flush=True)

            async def orchestrator_faults() -> None:
                while orchestrator_every_s > 0 and time.monotonic() + orchestrator_every_s < deadline:
                    await asyncio.sleep(orchestrator_every_s)
                    (active, _), (_, standby_url) = orchestrators[-2], orchestrators[-1]
                    active.send_signal(signal.SIGKILL)
                    active.wait()
                    counts["orchestrator_kills"] += 1
                    print("  killed the active orchestrator", flush=True)
                    while (await http.get("/health")).status_code != 200:  # the balancer finds the standby
                        await asyncio.sleep(0.1)
                    name = f"o{len(orchestrators)}"
                    orchestrators.append(
                        await asyncio.to_thread(start_serve, workdir, name, "--standby-of", standby_url)
                    )
                    balancer.backends = [standby_url, orchestrators[-1][1]]
                    print(f"  the standby took over; {name} stands by for it", flush=True)

            await asyncio.gather(faults(), orchestrator_faults(), bad_inputs(), *(client() for _ in range(clients)))
            final = (await http.get("/status")).json()
            counts["servers_alive_at_end"] = sum(s["alive"] for s in final["servers"])
    finally:
        balancer.close()
        for proc, _ in orchestrators:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        if endpoints:  # the detached block servers, restarted ones included
            await stop_servers(endpoints, (workdir / "token").read_text(), timeout_s=2)
    return counts


async def soak_single_chain(minutes: float, fault_every_s: float, clients: int, seed: int) -> dict:
    """The single-chain soak (module docstring): kills only, restarts by the launcher."""
    rng = random.Random(seed)
    head = EmulatedHead("toy", 6, 4096)
    workdir = Path(tempfile.mkdtemp(prefix="chainserve-soak-"))
    (workdir / "token").write_text(os.urandom(8).hex())
    wait = str(UNAVAILABLE_WAIT_S)
    proc, url = start_serve(workdir, "o0", str(SINGLE_CHAIN), "--planner", "greedy", "--unavailable-wait-s", wait)
    counts = dict.fromkeys(
        ("sent", "completed", "resumed", "retried_503", "unavailable", "lost", "wrong_text", "hung", "kills"), 0
    )
    patience_s = UNAVAILABLE_WAIT_S + 30
    deadline = time.monotonic() + minutes * 60
    try:
        oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def client() -> None:
                while time.monotonic() < deadline:
                    prompt, max_tokens = rng.choice(PROMPTS), rng.randint(4, 40)
                    counts["sent"] += 1
                    for attempt in range(4):
                        try:
                            answer = await complete(oai, prompt, max_tokens, patience_s)
                        except TimeoutError:
                            counts["hung"] += 1
                            break
                        except openai.APIStatusError as exc:
                            if exc.status_code != 503 or attempt == 3:
                                counts["unavailable" if exc.status_code == 503 else "lost"] += 1
                                break
                            counts["retried_503"] += 1
                            await asyncio.sleep(float(exc.response.headers.get("Retry-After", "1")))
                            continue
                        except openai.OpenAIError:
                            counts["lost"] += 1
                            break
                        check(counts, head, prompt, max_tokens, answer)
                        break

            async def faults() -> None:
                while time.monotonic() + fault_every_s < deadline:
                    await asyncio.sleep(fault_every_s)
                    servers = (await http.get("/status")).json()["servers"]
                    alive = [s for s in servers if s["alive"]]
                    if not alive:
                        continue
                    victim = rng.choice(alive)
                    os.kill(await server_pid(workdir, victim["name"], victim["endpoint"]), signal.SIGKILL)
                    counts["kills"] += 1
                    print(f"  killed block server {victim['name']}", flush=True)

            await asyncio.gather(faults(), *(client() for _ in range(clients)))
            while (await http.get("/health")).json()["status"] != "ok" and time.monotonic() < deadline + 60:
                await asyncio.sleep(0.5)
            final = (await http.get("/status")).json()
            counts["servers_alive_at_end"] = sum(s["alive"] for s in final["servers"])
            counts["restarts"] = sum(s["restarts"] for s in final["servers"])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return counts


async def server_pid(workdir: Path, name: str, endpoint: str) -> int:
    return await block_server_pid(name, endpoint, (workdir / "token").read_text())


def restart(workdir: Path, name: str, port: str) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chainserve",
            "block-server",
            "--plan",
            str(workdir / "plan.json"),
            "--id",
            name,
            "--port",
            port,
            "--token-file",
            str(workdir / "token"),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    proc.stdout.readline()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to run (at most 10)")
    parser.add_argument("--fault-every", type=float, default=15.0, help="seconds between server kills")
    parser.add_argument("--orchestrator-every", type=float, default=40.0,
                        help="seconds between kills of the active orchestrator (0: none)")  # fmt: skip
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cluster",
        choices=("six", "single-chain"),
        default="six",
        help="six: 6 servers, several chains, a standby; single-chain: a → b → c (issue 33)",
    )
    args = parser.parse_args()
    if not 0 < args.minutes <= 10:
        raise SystemExit("error: minutes: must lie in (0, 10]")
    if args.cluster == "single-chain":
        counts = asyncio.run(soak_single_chain(args.minutes, args.fault_every, args.clients, args.seed))
        print(
            f"requests served        {counts['completed']} of {counts['sent']} sent ({counts['resumed']} resumed "
            f"after a failure, {counts['retried_503']} 503s retried by their client)"
        )
        print(f"faults injected        {counts['kills']} block-server kills (SIGKILL); {counts['restarts']} restarts "
              "by the launcher")  # fmt: skip
        print(f"unavailable (503)      {counts['unavailable']} (still 503 after 3 retries)")
        print(f"lost                   {counts['lost']} (wrong text: {counts['wrong_text']})")
        print(f"hung                   {counts['hung']} (no answer within {UNAVAILABLE_WAIT_S + 30:g} s)")
        print(f"servers alive at end   {counts['servers_alive_at_end']}")
        return
    counts = asyncio.run(soak(args.minutes, args.fault_every, args.orchestrator_every, args.clients, args.seed))
    print(
        f"requests served        {counts['completed']} of {counts['sent']} sent "
        f"({counts['resumed']} resumed after a failure, {counts['cancelled_by_client']} hung up by their client)"
    )
    print(
        f"faults injected        {counts['kills']} block-server kills (SIGKILL), {counts['restarts']} restarts "
        f"by hand, {counts['orchestrator_kills']} orchestrator kills (SIGKILL; a standby took over)"
    )
    print(f"bad inputs rejected    {counts['bad_inputs_rejected']} of {counts['bad_inputs_sent']} (4xx)")
    print(f"lost                   {counts['lost']} (wrong text: {counts['wrong_text']}; errors: {counts['errors']})")
    print(f"servers alive at end   {counts['servers_alive_at_end']}")


if __name__ == "__main__":
    main()
