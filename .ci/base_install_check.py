"""The base install (``pip install .``, no extras) does what it offers (issue 28).

Run by ``.ci/run`` with the python of a fresh venv holding only chainserve and the official openai
client: plan, simulate, a torch-only flag (one ``error:`` line naming the extra), and a short
emulated ``serve`` answered through the openai client, then stopped with SIGTERM. Exits non-zero
with the reason on the first failure.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "paper-testbed-llama2-7b.yaml"
CLI = [sys.executable, "-m", "chainserve"]


def check(ok: bool, what: str, detail: str = "") -> None:
    if not ok:
        sys.exit(f"base install check failed: {what}\n{detail}")
    print(f"ok: {what}")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    for extra_module in ("torch", "transformers", "ray"):
        check(importlib.util.find_spec(extra_module) is None, f"{extra_module} is not installed (base install)")
    plan = run("plan", str(EXAMPLE), "--json")
    check(plan.returncode == 0 and '"chains"' in plan.stdout, "chainserve plan", plan.stderr[-2000:])
    sim = run("simulate", str(EXAMPLE), "--method", "proposed", "--requests", "300", "--json")
    check(sim.returncode == 0 and '"response"' in sim.stdout, "chainserve simulate", sim.stderr[-2000:])
    torch_flag = run("serve", str(EXAMPLE), "--backend", "torch", "--model", "smollm2-135m")
    lines = torch_flag.stderr.strip().splitlines()
    one_line = len(lines) == 1 and lines[0].startswith("error:") and "'torch' extra" in lines[0]
    check(
        torch_flag.returncode == 2 and one_line,
        "serve --backend torch: one error line naming the extra",
        torch_flag.stderr[-2000:],
    )
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        serve = subprocess.Popen(
            [*CLI, "serve", str(EXAMPLE), "--backend", "emulated", "--port", str(port), "--log-dir", tmp],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            deadline, healthy = time.monotonic() + 120, False
            while not healthy and serve.poll() is None and time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                        healthy = r.status == 200
                except OSError:
                    time.sleep(0.3)
            check(healthy, "serve (emulated) starts and answers /health")
            from openai import OpenAI

            client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
            answer = client.chat.completions.create(
                model=client.models.list().data[0].id,
                messages=[{"role": "user", "content": "what does the chain serve"}],
                max_tokens=8,
            )
            check(
                answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 8,
                "serve (emulated) answers the openai client",
            )
            with urllib.request.urlopen(f"{url}/", timeout=5) as r:
                check(r.status == 200 and b"chainserve" in r.read(), "the status page is served")
            stopped_at = time.monotonic()
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=30)
            check(serve.returncode == 0, f"serve exits 0 on SIGTERM (took {time.monotonic() - stopped_at:.1f} s)")
        finally:
            if serve.poll() is None:
                serve.kill()
            out = serve.stdout.read() if serve.stdout else ""
            if serve.returncode not in (0, None):
                print(out[-3000:])
    print("base install check passed")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
