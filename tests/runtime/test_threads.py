"""``--threads`` (issue 30, item 3): a block server's torch threads are a flag (default 1), passed by
``chainserve serve`` and both launchers to every block server, checked (≥ 1) with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from chainserve.cli import app
from chainserve.model.spec import SpecError
from chainserve.runtime.backends.base import SpanInfo
from chainserve.runtime.launch.local import BackendArgs, block_server_argv
from chainserve.runtime.layout import ServerSpec
from chainserve.runtime.service import ServeConfig

DATA = Path(__file__).parent / "data"
SPAN = ["--id", "a", "--first-block", "1", "--num-blocks", "2", "--block-slots", "4"]


def _stop(seen: dict):
    def fake(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise ValueError("stopped here")

    return fake


def test_block_server_and_serve_take_threads(monkeypatch):
    import chainserve.runtime.backends.factory as factory
    import chainserve.runtime.service as service

    seen: dict = {}
    monkeypatch.setattr(factory, "make_span", _stop(seen))
    result = CliRunner().invoke(app, ["block-server", *SPAN, "--backend", "torch", "--threads", "3"])
    assert result.exit_code == 2 and "stopped here" in result.output
    assert seen["args"][-1] == 3
    CliRunner().invoke(app, ["block-server", *SPAN])
    assert seen["args"][-1] == 1  # the default: several servers share the machine's cores
    monkeypatch.setattr(service, "ServeConfig", _stop(seen))
    CliRunner().invoke(app, ["serve", str(DATA / "tiny-3.yaml"), "--threads", "2"])
    assert seen["kwargs"]["threads"] == 2


@pytest.mark.parametrize("command", [["block-server", *SPAN], ["serve", str(DATA / "tiny-3.yaml")]])
def test_threads_below_one_is_a_clear_error(command):
    result = CliRunner().invoke(app, [*command, "--threads", "0"])
    assert result.exit_code == 2 and "threads" in result.output
    with pytest.raises(SpecError, match="threads: must be at least 1"):
        ServeConfig(cluster=DATA / "tiny-3.yaml", threads=0)


def test_launchers_pass_threads_to_every_block_server():
    spec = ServerSpec(0, "a", SpanInfo(1, 2, 4, 64), 0.01, 0.0)
    argv = block_server_argv(spec, BackendArgs("torch", "tiny-random", threads=4), 1.0, 0.0)
    assert argv[argv.index("--threads") + 1] == "4"
    argv = block_server_argv(spec, BackendArgs("emulated"), 1.0, 0.0)
    assert argv[argv.index("--threads") + 1] == "1"


def test_a_torch_span_sets_torch_threads(tmp_path):
    torch = pytest.importorskip("torch")
    from chainserve.runtime.backends.factory import make_span
    from chainserve.runtime.models import resolve_model

    model = str(resolve_model("tiny-random", tmp_path))
    before = torch.get_num_threads()
    try:
        make_span("torch", SpanInfo(1, 2, 2, 16), model, 0.0, "cpu", threads=2)[0].close()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads: must be at least 1"):
        make_span("torch", SpanInfo(1, 2, 2, 16), model, 0.0, "cpu", threads=0)
