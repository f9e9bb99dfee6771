"""The fused CPU kernels (issue 30, :mod:`chainserve.runtime.backends.cpu_kernels`) against the eager
operations they replace, on small hand-built instances: RoPE, the page writes and attention of decode
rows at ragged positions over scattered pages (grouped-query heads), SiLU·mul, the residual add with
RMSNorm, the panel GEMM; their checks on bad input; and the eager fallback where they are off or
cannot be built."""

import logging

import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

from chainserve.runtime.backends import cpu_kernels as module  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ops():
    built = module.cpu_kernels()
    if built is None:
        pytest.skip("the fused CPU kernels could not be built here")
    return built


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _instance(gen, rows=4, q_heads=6, kv_heads=2, dim=8, page=4, pool=40):
    qkv = torch.randn(rows, (q_heads + 2 * kv_heads) * dim, generator=gen)
    cos, sin = torch.randn(rows, dim, generator=gen), torch.randn(rows, dim, generator=gen)
    keys = torch.randn(pool, page, kv_heads, dim, generator=gen)
    values = torch.randn(pool, page, kv_heads, dim, generator=gen)
    table = torch.tensor([[7, 3, 30, 12], [0, 1, 2, 3], [39, 38, 5, 6], [20, 21, 22, 23]])  # scattered pages
    positions = torch.tensor([13, 0, 9, 4])  # ragged: one row at its first position, one past a page edge
    return qkv, cos, sin, keys, values, table, positions


def _eager(qkv, cos, sin, keys, values, table, positions, q_heads, kv_heads, scale):
    """What the lean layer's eager ops compute for each row: RoPE, the page write, sdpa over 0..p."""
    dim, page = keys.shape[-1], keys.shape[1]
    outs = []
    for r, p in enumerate(positions.tolist()):
        heads = qkv[r].view(-1, dim)
        q, k, v = heads[:q_heads], heads[q_heads : q_heads + kv_heads], heads[q_heads + kv_heads :]
        q, k = q * cos[r] + _rotate_half(q) * sin[r], k * cos[r] + _rotate_half(k) * sin[r]
        keys[table[r, p // page], p % page], values[table[r, p // page], p % page] = k, v
        seen_k = keys[table[r]].reshape(-1, kv_heads, dim)[: p + 1].transpose(0, 1)
        seen_v = values[table[r]].reshape(-1, kv_heads, dim)[: p + 1].transpose(0, 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            q[:, None], seen_k, seen_v, scale=scale, enable_gqa=True
        )  # fmt: skip
        outs.append(out.reshape(-1))
    return torch.stack(outs)


def test_paged_decode_attention_is_rope_page_writes_and_attention_over_the_pages(ops):
    gen = torch.Generator().manual_seed(0)
    qkv, cos, sin, keys, values, table, positions = _instance(gen)
    before, want_keys, want_values = keys.clone(), keys.clone(), values.clone()
    want = _eager(qkv, cos, sin, want_keys, want_values, table, positions, 6, 2, 0.3)
    got = ops.paged_decode_attention(qkv, cos, sin, keys, values, table, positions, 6, 2, 0.3)
    assert got.shape == (4, 6 * 8)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(keys, want_keys, rtol=1e-6, atol=1e-6) and torch.equal(values, want_values)
    written = torch.zeros(keys.shape[:2], dtype=torch.bool)  # each row's new position, and nothing else
    for r, p in enumerate(positions.tolist()):
        written[table[r, p // 4], p % 4] = True
    assert torch.equal(keys[~written], before[~written]) and not (keys[written] == before[written]).any()


def test_paged_decode_attention_reads_rows_of_a_wider_tensor(ops):
    """The lean layer hands it a slice of the merged q/k/v GEMM's output (rows of a packed batch)."""
    gen = torch.Generator().manual_seed(1)
    qkv, cos, sin, keys, values, table, positions = _instance(gen)
    wide = torch.cat([torch.zeros(4, 3), qkv], dim=1)[:, 3:]  # same values, row stride wider than the row
    a = ops.paged_decode_attention(qkv, cos, sin, keys.clone(), values.clone(), table, positions, 6, 2, 0.3)
    b = ops.paged_decode_attention(wide, cos, sin, keys.clone(), values.clone(), table, positions, 6, 2, 0.3)
    assert torch.equal(a, b)


def test_paged_decode_attention_refuses_positions_beyond_the_pages_and_pages_beyond_the_pool(ops):
    gen = torch.Generator().manual_seed(2)
    qkv, cos, sin, keys, values, table, positions = _instance(gen)
    with pytest.raises(RuntimeError, match="beyond its pages"):
        ops.paged_decode_attention(qkv, cos, sin, keys, values, table, torch.tensor([16, 0, 0, 0]), 6, 2, 0.3)
    with pytest.raises(RuntimeError, match="not in the pool"):
        ops.paged_decode_attention(qkv, cos, sin, keys, values, table + 100, positions, 6, 2, 0.3)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        ops.paged_decode_attention(qkv, cos, sin, keys, values, table, positions, 5, 2, 0.3)


def test_silu_mul_is_silu_of_gate_times_up(ops):
    gate_up = torch.randn(5, 2 * 96, generator=torch.Generator().manual_seed(3)) * 6
    gate, up = gate_up[:, :96], gate_up[:, 96:]
    assert torch.allclose(ops.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-6)


def test_rms_norm_is_torchs_rms_norm_on_rows_of_a_wider_tensor(ops):
    gen = torch.Generator().manual_seed(5)
    wide, weight = torch.randn(4, 600, generator=gen) * 20, torch.randn(576, generator=gen)
    hidden = wide[:, :576]  # rows with a stride wider than the row
    want = torch.nn.functional.rms_norm(hidden, (576,), weight, 1e-5)
    assert torch.allclose(ops.rms_norm(hidden, weight, 1e-5), want, rtol=1e-5, atol=1e-6)


def test_add_rms_norm_is_the_residual_add_then_rms_norm(ops):
    gen = torch.Generator().manual_seed(4)
    hidden, delta, weight = torch.randn(3, 576, generator=gen), torch.randn(3, 576, generator=gen), torch.randn(576)
    total, normed = ops.add_rms_norm(hidden, delta, weight, 1e-5)
    assert torch.equal(total, hidden + delta)
    want = torch.nn.functional.rms_norm(hidden + delta, (576,), weight, 1e-5)
    assert torch.allclose(normed, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("out", "width"), [(37, 5), (64, 9), (100, 33), (960, 576)])
def test_panel_linear_is_x_times_w_transposed_plus_bias(ops, out, width):
    """Whole and partly filled last panels, inputs of 0 to 64 rows (tiles of up to 12, evened out) under
    leading dimensions, with and without a bias; within fp32 rounding of ``F.linear``."""
    gen = torch.Generator().manual_seed(out)
    weight, bias = torch.randn(out, width, generator=gen), torch.randn(out, generator=gen)
    panels = ops.pack_panels(weight)
    assert panels.shape == ((out + 31) // 32, width, 32)
    for shape in ((0, width), (1, width), (3, 1, width), (2, 13, width), (25, width), (64, width)):
        x = torch.randn(*shape, generator=gen)
        for b in (None, bias):
            want = torch.nn.functional.linear(x, weight, b)
            got = ops.panel_linear(x, panels, out, b)
            assert got.shape == want.shape
            scale = float(torch.cat([want.abs().flatten(), torch.ones(1)]).max())
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)


def test_panel_linear_gives_a_row_the_same_bits_in_any_batch(ops):
    """Each output is the plain sum over the input in order, whoever else is in the batch."""
    gen = torch.Generator().manual_seed(6)
    weight, x = torch.randn(100, 70, generator=gen), torch.randn(29, 70, generator=gen)
    panels = ops.pack_panels(weight)
    whole = ops.panel_linear(x, panels, 100, None)
    for start, stop in ((0, 1), (5, 6), (2, 9), (0, 12), (3, 16), (7, 29)):
        assert torch.equal(ops.panel_linear(x[start:stop], panels, 100, None), whole[start:stop])


def test_panel_linear_refuses_what_does_not_match_its_panels(ops):
    weight = torch.randn(40, 8)
    panels = ops.pack_panels(weight)
    with pytest.raises(RuntimeError, match="in_features"):
        ops.panel_linear(torch.randn(2, 9), panels, 40, None)
    with pytest.raises(RuntimeError, match="out_features"):
        ops.panel_linear(torch.randn(2, 8), panels, 70, None)
    with pytest.raises(RuntimeError, match="bias"):
        ops.panel_linear(torch.randn(2, 8), panels, 40, torch.randn(41))
    with pytest.raises(RuntimeError, match="float32"):
        ops.pack_panels(weight.double())


def test_off_by_the_environment_or_without_a_compiler_the_lean_layer_keeps_eager_ops(monkeypatch, caplog):
    monkeypatch.setenv(module.DISABLE, "0")
    assert module.cpu_kernels.__wrapped__() is None
    monkeypatch.delenv(module.DISABLE)

    def no_compiler():
        raise RuntimeError("Error building extension\nc++: command not found")

    monkeypatch.setattr(module, "_build_and_load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="chainserve.kernels"):
        assert module.cpu_kernels.__wrapped__() is None
    assert "could not build (c++: command not found), eager ops" in caplog.text


def test_the_build_key_follows_the_source_and_the_flags(monkeypatch):
    key = module.kernels_key()
    assert key == module.kernels_key() and len(key) == 16
    monkeypatch.setattr(module, "FLAGS", (*module.FLAGS, "-g"))
    assert module.kernels_key() != key
