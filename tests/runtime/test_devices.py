"""Devices (issue 17): ``--device`` values are checked before anything starts, block servers of one
machine get a GPU each, and on a CUDA machine a bf16 span on the GPU computes what the fp32 CPU span
computes (skipped without a GPU)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from tests.runtime.conftest import DATA

from chainserve.model.spec import SpecError
from chainserve.runtime.backends.devices import check_device, spread
from chainserve.runtime.service import ServeConfig


def test_device_names_are_checked_and_normalised() -> None:
    assert [check_device(d) for d in ("auto", "CPU", "cuda", " cuda:3 ")] == ["auto", "cpu", "cuda", "cuda:3"]
    for bad in ("gpu", "cuda:", "cuda:x", "mps", ""):
        with pytest.raises(ValueError, match="auto|cpu|cuda"):
            check_device(bad)
    config = ServeConfig(cluster=DATA / "tiny-3.yaml", device="CUDA:1", devices={"t0": "cpu"})
    assert (config.device, config.devices) == ("cuda:1", {"t0": "cpu"})
    with pytest.raises(SpecError, match="device"):
        ServeConfig(cluster=DATA / "tiny-3.yaml", devices={"t0": "gpu0"})


def test_block_servers_of_one_machine_get_a_gpu_each() -> None:
    names = ["a", "b", "c", "d"]
    assert spread(names, "auto", {}, 2) == {"a": "cuda:0", "b": "cuda:1", "c": "cuda:0", "d": "cuda:1"}
    assert spread(names, "cuda", {"b": "cuda:1"}, 4) == {"a": "cuda:0", "b": "cuda:1", "c": "cuda:1", "d": "cuda:2"}
    assert spread(names, "cuda:3", {}, 4) == dict.fromkeys(names, "cuda:3")  # one device named for all
    assert spread(names, "auto", {}, 1) == dict.fromkeys(names, "auto")  # one GPU (or none): auto finds it


def test_a_bad_device_is_a_clear_cli_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "chainserve", "serve", str(DATA / "tiny-3.yaml"), "--device", "gpu0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0 and "device" in out.stderr and "auto|cpu|cuda" in out.stderr


def test_cuda_bf16_span_matches_the_cpu_span() -> None:
    torch = pytest.importorskip("torch", reason="the torch extra is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    from chainserve.runtime.backends.base import SpanInfo, SpanStep
    from chainserve.runtime.backends.devices import default_dtype, resolve_device
    from chainserve.runtime.backends.torch_backend import TorchHead, TorchSpan
    from chainserve.runtime.backends.torch_common import wire_to_torch
    from chainserve.runtime.models import resolve_model

    path, gpu = resolve_model("tiny-random"), resolve_device("cuda")
    head = TorchHead(path)
    hidden = head.embed(head.encode("The quick brown fox jumps over the lazy dog"))
    outs = []
    for device, dtype in ((torch.device("cpu"), torch.float32), (gpu, default_dtype(gpu))):
        span = TorchSpan(path, SpanInfo(1, 6, 6, 64), dtype, device)
        (out,) = asyncio.run(span.forward([SpanStep(hidden, 1, span.info.slot_pages(range(6)), 0)]))
        outs.append(wire_to_torch(out, 64).float())
        span.close()
    torch.testing.assert_close(outs[1], outs[0], rtol=0.05, atol=0.05)
