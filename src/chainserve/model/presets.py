"""The paper's clusters as code (paper §4.1 simulation, §4.2 testbed).

``examples/paper-sim-bloom-20.yaml`` and ``examples/paper-testbed-llama2-7b.yaml`` describe the same
problems in the cluster-file format; a test checks that both routes give equal :class:`Problem` s.
"""

from __future__ import annotations

import numpy as np

from chainserve.model import catalogue
from chainserve.model.cluster_file import replica_servers
from chainserve.model.spec import Problem, Server, SpecError, Workload

#: τ^p the paper measured for BLOOM-176B NF4 on the two MIG slices (§4.1), seconds per block per job.
PAPER_TAU_P_S = {"a100-3g.40gb": 0.109, "a100-2g.20gb": 0.175}
#: Synthetic stand-in for the RIPE Atlas EU RTTs the paper drew from (we do not have that data).
SIM_RTT_RANGE_MS = (10.0, 100.0)
#: Fixed testbed RTTs (ms) of the 3 high and 6 low servers: synthetic, spread over the same range.
TESTBED_RTTS_MS = {"high": (20.0, 35.0, 50.0), "low": (15.0, 30.0, 45.0, 60.0, 75.0, 90.0)}


def paper_sim_cluster(num_servers: int, eta: float, rng: np.random.Generator, arrival_rate: float = 0.2) -> Problem:
    """The §4.1 simulated cluster: BLOOM-176B in NF4 (s_c for 2048 tokens), 2000 prompt / 20 output
    tokens, ρ̄ = 0.7; ``round(eta·J)`` "high" servers (A100 MIG 3g.40gb, 40 GB, τ^p = 0.109 s) named
    ``high-1 …``, the rest "low" (2g.20gb, 20 GB, τ^p = 0.175 s) named ``low-1 …``.

    RTTs: the paper sampled RIPE Atlas EU measurements, which we lack; instead each server's RTT is
    drawn i.i.d. uniform on 10–100 ms from ``rng`` (high servers first) and rounded to 0.1 ms, as a
    measurement would be. τ^c_j = (RTT_j + 18 ms) × 20 round trips (one per output token).

    >>> p = paper_sim_cluster(20, 0.2, np.random.default_rng(0))
    >>> p.model.num_blocks, sum(s.gpu == "a100-3g.40gb" for s in p.servers), p.servers[0].name
    (70, 4, 'high-1')
    """
    if isinstance(num_servers, bool) or not isinstance(num_servers, int) or num_servers < 1:
        raise SpecError("num_servers", f"must be a positive integer, got {num_servers!r}")
    if not 0 <= eta <= 1:
        raise SpecError("eta", f"must lie in [0, 1], got {eta!r}")
    workload = Workload(arrival_rate, rho_bar=0.7, prompt_tokens=2000, output_tokens=20)
    model = catalogue.model_arch("bloom-176b").spec("nf4", max_tokens=2048)
    rtts_s = np.round(rng.uniform(*SIM_RTT_RANGE_MS, size=num_servers), 1) / 1000
    num_high = round(eta * num_servers)
    servers = _paper_servers("high", "a100-3g.40gb", rtts_s[:num_high], workload) + _paper_servers(
        "low", "a100-2g.20gb", rtts_s[num_high:], workload
    )
    return Problem(servers, model, workload, f"paper-sim-bloom-{num_servers}")


def _paper_servers(name: str, gpu: str, rtts_s: np.ndarray, workload: Workload) -> tuple[Server, ...]:
    return replica_servers(
        name,
        len(rtts_s),
        memory_gb=catalogue.gpu_profile(gpu).memory_gb,
        tau_p_s=PAPER_TAU_P_S[gpu],
        rtts_s=[float(r) for r in rtts_s],
        round_trips=workload.output_tokens,
        gpu=gpu,
    )


def paper_testbed(arrival_rate: float = 2.57, max_tokens: int | None = None, model: str = "llama-2-7b") -> Problem:
    """The §4.2 testbed: LLaMA-2-7B in fp16 (s_c for 2048 + 28 tokens) on three A100-80GB split by
    MIG into 3× 3g.40gb ("high-1..3") + 6× 2g.20gb ("low-1..6"); 2048 prompt / 28 output tokens
    (the Azure code trace's means), λ = 2.57/s, ρ̄ = 0.7; ``max_tokens`` sizes s_c (default 2048 + 28).
    ``model``: another catalogue model in fp16 on the same slices (``llama-2-13b`` gives the
    memory-tight variant: 25.4 GB of weights, too large for a 20 GB slice); the problem is then named
    ``paper-testbed-<model>``.
    τ^p comes from the catalogue formula
    (:func:`catalogue.tau_p_s`), τ^c = (RTT + 18 ms) × 28 with the fixed synthetic RTTs of
    :data:`TESTBED_RTTS_MS` (the paper emulated WAN delays with netem but does not list them).

    >>> p = paper_testbed()
    >>> p.num_servers, p.model.num_blocks, p.servers[3].name
    (9, 32, 'low-1')
    """
    workload = Workload(arrival_rate, rho_bar=0.7, prompt_tokens=2048, output_tokens=28)
    arch = catalogue.model_arch(model)
    spec = arch.spec("fp16", max_tokens=max_tokens or workload.prompt_tokens + workload.output_tokens)
    servers: tuple[Server, ...] = ()
    for name, gpu in (("high", "a100-3g.40gb"), ("low", "a100-2g.20gb")):
        profile = catalogue.gpu_profile(gpu)
        rtts = TESTBED_RTTS_MS[name]
        tau_p = catalogue.tau_p_s(profile, arch, spec.block_size_gb, workload.prompt_tokens, workload.output_tokens)
        servers += replica_servers(
            name,
            len(rtts),
            memory_gb=profile.memory_gb,
            tau_p_s=tau_p,
            gpu=gpu,
            rtts_s=[r / 1000 for r in rtts],
            round_trips=workload.output_tokens,
        )
    return Problem(servers, spec, workload, "paper-testbed" if model == "llama-2-7b" else f"paper-testbed-{model}")
