"""Soak: mixed load on a live emulated cluster while block servers are killed and restarted and
malformed requests arrive; nothing may be lost (the reliability issue's soak, ≤ 10 minutes).

Starts ``chainserve serve`` on the 6-server emulated test cluster (as a user would), then for
``--minutes``: streamed completions of random lengths from several clients, some of which hang up
early (cancellations); a malformed request every second (each must get a 4xx); every ``--fault-every``
seconds a random block server gets SIGKILL and is restarted by hand (same id and port, from the saved
plan) a few seconds later. Every completed answer is checked against the emulated model's greedy text.

    python benchmarks/soak.py                 # 3 minutes
    python benchmarks/soak.py --minutes 9
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

from chainserve.measure.bench import BenchRequest, completion_body, stream_request
from chainserve.runtime.backends.emulated import EmulatedHead

CLUSTER = Path(__file__).resolve().parents[1] / "tests" / "runtime" / "data" / "emulated-6.yaml"
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


def start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    (workdir / "token").write_text(os.urandom(8).hex())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chainserve",
            "serve",
            str(CLUSTER),
            "--backend",
            "emulated",
            "--planner",
            "greedy",
            "--port",
            "0",
            "--token-file",
            str(workdir / "token"),
            "--log-dir",
            str(workdir / "logs"),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=open(workdir / "serve.err", "wb"),
        text=True,
    )
    for line in proc.stdout:
        match = re.search(r"on (http://\S+)", line)
        if match:
            return proc, match.group(1)
    raise SystemExit("chainserve serve did not start: " + (workdir / "serve.err").read_text()[-2000:])


async def soak(minutes: float, fault_every_s: float, clients: int, seed: int) -> dict:
    rng = random.Random(seed)
    head = EmulatedHead("toy", 8, 4096)
    workdir = Path(tempfile.mkdtemp(prefix="chainserve-soak-"))
    proc, url = start_server(workdir)
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
    }
    deadline = time.monotonic() + minutes * 60
    try:
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            plan = (await http.get("/plan")).json()
            (workdir / "plan.json").write_text(json.dumps(plan))
            status = (await http.get("/status")).json()
            ports = {s["name"]: s["endpoint"].rsplit(":", 1)[1] for s in status["servers"]}

            async def client() -> None:
                while time.monotonic() < deadline:
                    prompt, max_tokens = rng.choice(PROMPTS), rng.randint(4, 40)
                    counts["sent"] += 1
                    patience = 0.2 if rng.random() < 0.1 else None  # some clients hang up after a moment
                    try:
                        body = completion_body(0, BenchRequest(0.0, 0, max_tokens, prompt=prompt), None)
                        result = await asyncio.wait_for(stream_request(http, body), patience)
                    except TimeoutError:
                        counts["cancelled_by_client"] += 1
                        continue
                    if not result.ok:
                        counts["lost"] += 1
                    elif result.text != head.greedy_text(prompt, max_tokens):
                        counts["wrong_text"] += 1
                        counts["lost"] += 1
                    else:
                        counts["completed"] += 1
                        counts["resumed"] += result.num_attempts > 1

            async def bad_inputs() -> None:
                while time.monotonic() < deadline:
                    body = rng.choice(BAD_BODIES)
                    counts["bad_inputs_sent"] += 1
                    kwargs = (
                        {"content": body, "headers": {"content-type": "application/json"}}
                        if isinstance(body, str)
                        else {"json": body}
                    )
                    response = await http.post("/v1/completions", **kwargs)
                    counts["bad_inputs_rejected"] += 400 <= response.status_code < 500
                    await asyncio.sleep(1.0)

            async def faults() -> None:
                while time.monotonic() + fault_every_s < deadline:
                    await asyncio.sleep(fault_every_s)
                    infos = (await http.get("/status")).json()["servers"]
                    victim = rng.choice([s["name"] for s in infos if s["alive"]])
                    pid = await server_pid(workdir, plan, victim, status)
                    os.kill(pid, signal.SIGKILL)
                    counts["kills"] += 1
                    print(f"  killed {victim}", flush=True)
                    await asyncio.sleep(rng.uniform(2, 6))
                    restart(workdir, victim, ports[victim])
                    counts["restarts"] += 1
                    print(f"  restarted {victim}", flush=True)

            await asyncio.gather(faults(), bad_inputs(), *(client() for _ in range(clients)))
            final = (await http.get("/status")).json()
            counts["servers_alive_at_end"] = sum(s["alive"] for s in final["servers"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        for extra in workdir.glob("restarted-*.pid"):
            try:
                os.kill(int(extra.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
    return counts


async def server_pid(workdir: Path, plan: dict, name: str, status: dict) -> int:
    from chainserve.runtime.client import BlockClient

    endpoint = next(s["endpoint"] for s in status["servers"] if s["name"] == name)
    client = BlockClient(name, endpoint, (workdir / "token").read_text())
    try:
        return int((await client.info())["pid"])
    finally:
        client.close()


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
    (workdir / f"restarted-{name}-{proc.pid}.pid").write_text(str(proc.pid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to run (at most 10)")
    parser.add_argument("--fault-every", type=float, default=15.0, help="seconds between server kills")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.minutes <= 10:
        raise SystemExit("error: minutes: must lie in (0, 10]")
    counts = asyncio.run(soak(args.minutes, args.fault_every, args.clients, args.seed))
    print(
        f"requests served        {counts['completed']} of {counts['sent']} sent "
        f"({counts['resumed']} resumed after a failure, {counts['cancelled_by_client']} hung up by their client)"
    )
    print(f"faults injected        {counts['kills']} kills (SIGKILL), {counts['restarts']} restarts by hand")
    print(f"bad inputs rejected    {counts['bad_inputs_rejected']} of {counts['bad_inputs_sent']} (4xx)")
    print(f"lost                   {counts['lost']} (wrong text: {counts['wrong_text']})")
    print(f"servers alive at end   {counts['servers_alive_at_end']}")


if __name__ == "__main__":
    main()
