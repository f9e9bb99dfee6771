"""chainserve against vLLM's CPU engine (issue 30), measured by vLLM's own client, ``vllm bench serve``.

One run serves the same model directory (SmolLM2-135M-Instruct, fp32, CPU) three ways, all up at once
(an idle server takes no measurable CPU: vLLM's 1.7 % of a core), and sends each the same ``vllm bench
serve`` workload (random prompts of ``--input-len`` tokens, ``--output-len`` output tokens with
``--ignore-eos`` so every request makes exactly that many, ``--num-prompts`` requests at each
``--max-concurrency`` of ``--concurrency``):

1. vLLM's OpenAI server (``vllm serve``) on its CPU engine with one compute thread;
2. chainserve with ONE block server holding all 30 blocks (benchmarks/data/vs-vllm-1server.yaml);
3. chainserve with a chain of three block servers of 10 blocks each (benchmarks/data/vs-vllm-3servers.yaml).

``--rounds N`` runs every concurrency of every system N times, interleaved (round 1: c₁ on each system,
c₂ on each, …; then round 2), so a slow spell of a shared machine (seen here: whole runs 20 % slower
minutes apart, stalls of 0.5 s) falls on both sides of a ratio. It prints output tokens/s
(``output_throughput`` of ``vllm bench serve --save-result``'s JSON), the median over rounds, per
concurrency; chainserve's ratio to vLLM, the median of the rounds' ratios (each round's listed); and
issue 30's targets (ratio ≥ 1.0 at concurrency 1, ≥ 0.9 at 8 and 16 for the one-server chainserve).
Every process it starts runs in its own process group and is stopped (SIGTERM, then SIGKILL) at the
end, on an error and on Ctrl-C.

Fairness. Both systems compute on one thread: chainserve's block servers run one torch thread each
(``OMP_NUM_THREADS=1``, its local launcher), vLLM gets ``OMP_NUM_THREADS=1`` and
``VLLM_CPU_OMP_THREADS_BIND=nobind`` (no pinning, like chainserve; ``--vllm-bind 0`` pins its one OMP
thread to CPU 0 instead). ``--cpus LIST`` runs every server and the client under ``taskset -c LIST``
(the same cores for both systems); by default nothing is pinned. vLLM's KV cache is
``VLLM_CPU_KVCACHE_SPACE=--vllm-kv-gib`` GiB; its context is ``--max-model-len`` (chainserve's cluster
files: 512 tokens). Each ``vllm bench serve`` run starts with vLLM's single-prompt test request.

Not in CI: it needs vLLM's CPU engine, installed in its own venv (never a chainserve dependency) by::

    benchmarks/vllm_cpu_env.sh                    # ~/.cache/chainserve/vllm-cpu-venv, vllm-cpu pinned

then, from the repository root (chainserve importable, e.g. ``PYTHONPATH=src``)::

    python benchmarks/vs_vllm.py                              # all three, concurrency 1 4 8 16
    python benchmarks/vs_vllm.py --concurrency 1 8 --only vllm chainserve-1
    python benchmarks/vs_vllm.py --concurrency 8 16 --rounds 3 --only vllm chainserve-1   # paired rounds
    python benchmarks/vs_vllm.py --json vs_vllm.json --log-dir /tmp/vs-vllm   # keep figures and logs

A full run (64 prompts, four concurrencies, three systems, one round) takes ~15-25 min on two busy cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

DATA = Path(__file__).parent / "data"
DEFAULT_VENV = Path.home() / ".cache" / "chainserve" / "vllm-cpu-venv"
SYSTEMS = {
    "vllm": None,
    "chainserve-1": DATA / "vs-vllm-1server.yaml",
    "chainserve-3": DATA / "vs-vllm-3servers.yaml",
}
#: Issue 30's acceptance: chainserve (one block server) / vLLM output tokens/s at these concurrencies.
TARGETS = {1: 1.0, 8: 0.9, 16: 0.9}


class BenchError(RuntimeError):
    """A server did not come up, or ``vllm bench serve`` failed."""


@dataclass
class Child:
    """A process started in its own process group (so that stopping it stops what it started)."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return "\n".join(f"    {line}" for line in text[-lines:])

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the leader (a graceful stop: chainserve stops its block servers, vLLM its engine),
        then SIGTERM the group, SIGKILL whatever of the group is left, and reap the leader."""
        pgid = self.proc.pid
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        for sig, pause in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                break  # the group is empty
            time.sleep(pause)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@contextlib.contextmanager
def child(name: str, argv: Sequence[str], env: dict[str, str], log_path: Path, cpus: str | None) -> Iterator[Child]:
    """Run ``argv`` (stdout and stderr to ``log_path``) in a new session for the block; stop it after."""
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    started = Child(name, proc, log_path)
    try:
        yield started
    finally:
        started.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(server: Child, base_url: str, timeout_s: float) -> str:
    """Poll ``GET /v1/models`` until it answers; returns the served model id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise BenchError(f"{server.name} exited ({server.proc.returncode}) before it was ready:\n{server.tail()}")
        try:
            with urllib.request.urlopen(f"{base_url}/v1/models", timeout=5) as r:
                return str(json.load(r)["data"][0]["id"])
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, KeyError, IndexError, ValueError):
            time.sleep(1.0)
    raise BenchError(f"{server.name} was not ready within {timeout_s:g} s:\n{server.tail()}")


@dataclass
class Run:
    """One system's figures: concurrency → ``vllm bench serve``'s result JSON of each round."""

    system: str
    results: dict[int, list[dict]] = field(default_factory=dict)

    def rounds(self, c: int) -> list[float]:
        """Output tokens/s of each round at concurrency ``c``."""
        return [float(r["output_throughput"]) for r in self.results.get(c, [])]

    def tokens_per_s(self, c: int) -> float | None:
        """The median over rounds (``None`` if none ran)."""
        got = self.rounds(c)
        return statistics.median(got) if got else None


def bench(args: argparse.Namespace, server: Server, c: int, rnd: int, tokenizer: Path, work: Path) -> dict:
    """One ``vllm bench serve`` against ``server`` at concurrency ``c`` (round ``rnd``): its result JSON."""
    system, base_url, model_id = server.system, server.base_url, server.model_id
    name = f"{system}-c{c}-r{rnd}.json"
    argv = [
        str(args.venv / "bin" / "vllm"),
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        model_id,
        "--tokenizer",
        str(tokenizer),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--num-prompts",
        str(args.num_prompts),
        "--max-concurrency",
        str(c),
        "--ignore-eos",
        "--temperature",
        "0",
        "--seed",
        str(args.seed),
        "--save-result",
        "--result-dir",
        str(work),
        "--result-filename",
        name,
    ]
    if args.cpus:
        argv = ["taskset", "-c", args.cpus, *argv]
    log_path = work / f"{system}-c{c}-r{rnd}.log"
    print(f"  round {rnd}, {system}: vllm bench serve --max-concurrency {c} ...", flush=True)
    began = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=client_env(args), start_new_session=True
        )
        try:
            code = proc.wait(args.bench_timeout_s)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    out = work / name
    if code != 0 or not out.exists():
        tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-20:])
        raise BenchError(f"vllm bench serve against {system} at concurrency {c} failed ({code}):\n{tail}")
    result = json.loads(out.read_text())
    print(
        f"  {system}: c={c}: {result['output_throughput']:.2f} output tok/s, "
        f"{result['completed']}/{args.num_prompts} completed, {time.monotonic() - began:.0f} s",
        flush=True,
    )
    if result["completed"] != args.num_prompts:
        raise BenchError(f"{system} at concurrency {c}: only {result['completed']} of {args.num_prompts} completed")
    return result


def client_env(args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv's python, not chainserve's path
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass(frozen=True)
class Server:
    """A system's server, up and answering: its name in :data:`SYSTEMS`, base URL and served model id."""

    system: str
    base_url: str
    model_id: str


def start_vllm(args: argparse.Namespace, model_dir: Path, work: Path, stack: contextlib.ExitStack) -> Server:
    """``vllm serve`` on its CPU engine, stopped when ``stack`` closes."""
    port = free_port()
    env = {
        **client_env(args),
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_OMP_THREADS_BIND": args.vllm_bind,
        "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    argv = [
        str(args.venv / "bin" / "vllm"),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(args.max_model_len),
        "--seed",
        str(args.seed),
    ]
    print(f"vLLM: starting vllm serve on port {port} (log {work / 'vllm-serve.log'})", flush=True)
    return up(args, stack, "vllm", "vLLM", child("vllm serve", argv, env, work / "vllm-serve.log", args.cpus), port)


def start_chainserve(args: argparse.Namespace, system: str, work: Path, stack: contextlib.ExitStack) -> Server:
    """``chainserve serve`` of ``system``'s cluster file, stopped when ``stack`` closes."""
    cluster = SYSTEMS[system]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable,
        "-m",
        "chainserve",
        "serve",
        str(cluster),
        "--backend",
        "torch",
        "--model",
        args.model,
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-dir",
        str(work / f"{system}-servers"),
    ]
    print(f"{system}: starting chainserve serve {cluster.name} on port {port}", flush=True)
    started = child(f"chainserve serve ({system})", argv, env, work / f"{system}-serve.log", args.cpus)
    return up(args, stack, system, system, started, port)


def up(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    system: str,
    shown: str,
    started: contextlib.AbstractContextManager[Child],
    port: int,
) -> Server:
    """The server ``started`` on ``port``, stopped when ``stack`` closes, once it answers (``shown``: its
    name in the progress lines)."""
    server = stack.enter_context(started)
    base_url = f"http://127.0.0.1:{port}"
    model_id = wait_ready(server, base_url, args.ready_timeout_s)
    print(f"{shown}: ready ({model_id})", flush=True)
    return Server(system, base_url, model_id)


def measure(args: argparse.Namespace, servers: list[Server], tokenizer: Path, work: Path, runs: dict[str, Run]) -> None:
    """``--rounds`` rounds; in each, every concurrency, every system one after the other (so a slow
    spell of a shared machine falls on both sides of a ratio, not on one system's whole run). Each
    result lands in ``runs`` as it comes, so a later failure still leaves the earlier ones to print."""
    for rnd in range(1, args.rounds + 1):
        for c in args.concurrency:
            for server in servers:
                result = bench(args, server, c, rnd, tokenizer, work)
                runs.setdefault(server.system, Run(server.system)).results.setdefault(c, []).append(result)


def paired_ratios(run: Run | None, vllm: Run | None, c: int) -> list[float]:
    """``run`` / vLLM at concurrency ``c``, round by round (rounds both completed)."""
    if run is None or vllm is None:
        return []
    return [t / v for t, v in zip(run.rounds(c), vllm.rounds(c), strict=False) if v > 0]


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def table(args: argparse.Namespace, runs: dict[str, Run]) -> tuple[str, list[dict]]:
    """The printed comparison and its rows (for ``--json``)."""
    vllm = runs.get("vllm")
    rows, lines = [], []
    header = (
        f"{'conc':>4} | {'vLLM tok/s':>10} | {'cs-1 tok/s':>10} {'ratio':>6} | {'cs-3 tok/s':>10} {'ratio':>6} | target"
    )
    lines += [header, "-" * len(header)]
    for c in args.concurrency:
        v = vllm.tokens_per_s(c) if vllm else None
        row: dict = {"concurrency": c, "vllm_tok_s": v}
        cells = []
        for system, key in (("chainserve-1", "chainserve_1server"), ("chainserve-3", "chainserve_3servers")):
            run = runs.get(system)
            t = run.tokens_per_s(c) if run else None
            paired = paired_ratios(run, vllm, c)
            ratio = statistics.median(paired) if paired else None
            row[f"{key}_tok_s"], row[f"{key}_ratio"], row[f"{key}_round_ratios"] = t, ratio, paired
            cells.append(f"{fmt(t):>10} {fmt(ratio, '.2f') + 'x' if ratio is not None else '—':>6}")
        target = TARGETS.get(c)
        mark = ""
        if target is not None:
            ratio = row["chainserve_1server_ratio"]
            met = None if ratio is None else ratio >= target
            row["target_ratio"], row["target_met"] = target, met
            mark = f"≥ {target:.1f}: " + ("—" if met is None else "met" if met else "NOT met")
        rows.append(row)
        lines.append(f"{c:>4} | {fmt(v):>10} | {cells[0]} | {cells[1]} | {mark}")
        if args.rounds > 1 and row["chainserve_1server_round_ratios"]:
            by_round = ", ".join(f"{r:.2f}" for r in row["chainserve_1server_round_ratios"])
            lines.append(f"     |   cs-1 / vLLM by round: {by_round}")
    lines.append(
        f"output tokens/s of `vllm bench serve` (random {args.input_len} → {args.output_len} tokens, "
        f"{args.num_prompts} prompts, --ignore-eos), the median of {args.rounds} round(s); ratio = the median "
        "of each round's chainserve / vLLM; cs-1: one block server (30 blocks), cs-3: chain of three "
        "(10 + 10 + 10); target: cs-1's ratio"
    )
    return "\n".join(lines), rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="vLLM CPU venv (benchmarks/vllm_cpu_env.sh)")
    p.add_argument("--model", default="smollm2-135m", help="chainserve's --model; vLLM serves its directory")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1, help="rounds of every concurrency × system, interleaved")
    p.add_argument("--only", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS), help="systems to run")
    p.add_argument("--cpus", default=None, help="taskset -c LIST for every server and the client (default: none)")
    p.add_argument("--vllm-bind", default="nobind", help="VLLM_CPU_OMP_THREADS_BIND (default nobind; e.g. 0)")
    p.add_argument("--vllm-kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE in GiB")
    p.add_argument("--max-model-len", type=int, default=512, help="vLLM's context (chainserve's files: 512)")
    p.add_argument("--ready-timeout-s", type=float, default=600.0)
    p.add_argument("--bench-timeout-s", type=float, default=1800.0)
    p.add_argument("--log-dir", type=Path, default=None, help="keep logs and result JSONs here (default: temp)")
    p.add_argument("--json", type=Path, default=None, help="also write the table's rows and raw results here")
    return p.parse_args(argv)


def describe(venv: Path) -> str:
    """The versions compared: vllm-cpu (in ``venv``) and chainserve's git commit."""
    probe = "import importlib.metadata as m; print(m.version('vllm-cpu'))"
    vllm = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=False)
    here = Path(__file__).parent
    git = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain"], capture_output=True, text=True)
    commit = (git.stdout.strip() or "?") + ("+dirty" if dirty.stdout.strip() else "")
    return f"vllm-cpu {vllm.stdout.strip() or '?'}, chainserve {commit}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    vllm_bin = args.venv / "bin" / "vllm"
    if not vllm_bin.exists():
        print(f"no vLLM CPU venv at {args.venv}: run benchmarks/vllm_cpu_env.sh first", file=sys.stderr)
        return 2
    if args.cpus and shutil.which("taskset") is None:
        print("--cpus needs taskset", file=sys.stderr)
        return 2
    from chainserve.runtime.models import resolve_model

    model_dir = Path(resolve_model(args.model)).resolve()
    # SIGTERM (e.g. from a job runner) unwinds like Ctrl-C, so every `finally` stops its processes.
    signal.signal(signal.SIGTERM, _interrupt)
    began = datetime.now().astimezone()
    versions = describe(args.venv)
    print(f"vs_vllm: {began:%Y-%m-%d %H:%M %Z}, {versions}, model {model_dir}", flush=True)
    with contextlib.ExitStack() as stack:
        if args.log_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vs-vllm-")))
        else:
            work = args.log_dir
            work.mkdir(parents=True, exist_ok=True)
        runs: dict[str, Run] = {}
        try:
            servers = [
                start_vllm(args, model_dir, work, stack)
                if system == "vllm"
                else start_chainserve(args, system, work, stack)
                for system in args.only
            ]
            measure(args, servers, model_dir, work, runs)
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            if runs:
                print(table(args, runs)[0])
            return 1
        except KeyboardInterrupt:
            print("interrupted: every started process was stopped", file=sys.stderr)
            return 130
        text, rows = table(args, runs)
        minutes = (datetime.now().astimezone() - began).total_seconds() / 60
        print(f"\nvs_vllm ({began:%Y-%m-%d %H:%M %Z}, {minutes:.0f} min; {versions})\n{text}")
        if args.json is not None:
            args.json.write_text(
                json.dumps(
                    {
                        "started": began.isoformat(),
                        "versions": versions,
                        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                        "rows": rows,
                        "results": {s: {str(c): rs for c, rs in run.results.items()} for s, run in runs.items()},
                    },
                    indent=1,
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
