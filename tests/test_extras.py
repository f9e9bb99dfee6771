"""Optional extras (issue 28): the base install serves the emulated backend; a feature whose extra is
missing says so in one ``error:`` line, never a traceback."""

import subprocess
import sys

import pytest

from chainserve import extras
from chainserve.runtime.service import ServeConfig


@pytest.fixture
def no_torch(monkeypatch):
    """As if the torch extra were not installed."""
    real = extras.find_spec
    monkeypatch.setattr(extras, "find_spec", lambda name: None if name == "transformers" else real(name))


def test_serving_the_emulated_backend_imports_no_extra():
    code = (
        "import sys; import chainserve.runtime.service, chainserve.runtime.api, chainserve.cli.serve_cmd; "
        "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_missing_extra_is_named_with_its_install(no_torch):
    with pytest.raises(extras.MissingExtra, match=r"the torch backend needs the 'torch' extra \(transformers is not "
                       r"installed\): pip install 'chainserve\[torch\]'"):  # fmt: skip
        ServeConfig(cluster="c.yaml", backend="torch", model="smollm2-135m")
    ServeConfig(cluster="c.yaml", backend="emulated")  # the base install's backend needs none


def test_the_cli_prints_one_error_line_for_a_missing_extra(no_torch, tmp_path):
    from typer.testing import CliRunner

    from chainserve.cli import app

    args = "block-server --id a --first-block 1 --num-blocks 2 --block-slots 2 --backend torch --model smollm2-135m"
    result = CliRunner().invoke(app, args.split())
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: the torch backend needs the 'torch' extra (transformers is not installed): pip install "
        "'chainserve[torch]'"
    ]
