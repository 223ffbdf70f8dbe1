"""Host tables in PyTorch: the custom ops, training inside backward with the fused optimizers
against dense torch references, and their errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import engram_rs as er  # noqa: E402
from engram_rs.torch import SparseAdam, SparseRowwiseAdagrad, SparseSGD, ops  # noqa: E402

ROWS, DIM = 50, 8


def table_and_copy(tmp_path, dtype: str = "float32") -> tuple[er.HostTable, torch.Tensor]:
    """A writable mmap table with random rows, and the same rows as a float32 tensor."""
    path = tmp_path / f"t-{dtype}.safetensors"
    er.HostTable.create(path, ROWS, DIM if dtype != "float8_e4m3" else 32, dtype=dtype, seed=3)
    t = er.HostTable.open(path, mode="mmap", writable=True)
    return t, torch.from_numpy(t.gather(np.arange(ROWS), out_dtype="float32").copy())


def steps(n: int = 5, batch: int = 40, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rows with repeats, upstream gradient) per step."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rows = torch.randint(0, ROWS // 3, (batch,), generator=g)  # many repeats
        out.append((rows, torch.randn(batch, DIM, generator=g)))
    return out


def train_host(table: er.HostTable, opt: object, data: list) -> None:
    handle = ops.register(table, opt)  # type: ignore[arg-type]
    anchor = torch.nn.Parameter(torch.empty(0))
    for rows, upstream in data:
        out = torch.ops.engram_rs.host_gather(anchor, rows, handle)
        (out * upstream).sum().backward()


def host_rows(table: er.HostTable) -> torch.Tensor:
    return torch.from_numpy(table.gather(np.arange(ROWS), out_dtype="float32").copy())


def test_sparse_adam_equals_torch_sparse_adam(tmp_path) -> None:
    table, w0 = table_and_copy(tmp_path)
    data = steps()
    train_host(table, SparseAdam(lr=0.01, betas=(0.8, 0.95), eps=1e-6), data)
    emb = torch.nn.Embedding(ROWS, DIM, sparse=True, _weight=w0.clone())
    ref = torch.optim.SparseAdam(emb.parameters(), lr=0.01, betas=(0.8, 0.95), eps=1e-6)
    for rows, upstream in data:
        ref.zero_grad()
        (emb(rows) * upstream).sum().backward()
        ref.step()
    torch.testing.assert_close(host_rows(table), emb.weight.detach(), rtol=1e-6, atol=1e-6)
    assert not torch.equal(host_rows(table), w0)


def test_rowwise_adagrad_equals_a_few_lines_of_torch(tmp_path) -> None:
    table, w = table_and_copy(tmp_path)
    data = steps(seed=1)
    train_host(table, SparseRowwiseAdagrad(lr=0.1, eps=1e-8), data)
    acc = torch.zeros(ROWS)
    for rows, upstream in data:
        g = torch.zeros(ROWS, DIM).index_add_(0, rows, upstream)  # duplicate rows summed
        touched = torch.unique(rows)
        acc[touched] += (g[touched] ** 2).mean(dim=1)
        w[touched] -= 0.1 * g[touched] / (acc[touched].sqrt()[:, None] + 1e-8)
    torch.testing.assert_close(host_rows(table), w, rtol=1e-6, atol=1e-6)


def test_sgd_applies_the_exact_gradient(tmp_path) -> None:
    """With lr = 1 the update is the gradient itself: checked against autograd through a dense
    float64 embedding (the host gather's gradient, as gradcheck would check it)."""
    table, w0 = table_and_copy(tmp_path)
    data = steps(n=1, seed=2)
    train_host(table, SparseSGD(lr=1.0), data)
    dense = w0.double().requires_grad_()
    rows, upstream = data[0]
    (dense[rows] * upstream.double()).sum().backward()
    assert dense.grad is not None
    torch.testing.assert_close((w0 - host_rows(table)).double(), dense.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3"])
def test_low_precision_tables_train_with_float32_state(tmp_path, dtype: str) -> None:
    table, w0 = table_and_copy(tmp_path, dtype)
    dim = table.dim
    rows = torch.tensor([1, 1, 4])
    upstream = torch.ones(3, dim)
    handle = ops.register(table, SparseSGD(lr=0.5))
    anchor = torch.nn.Parameter(torch.empty(0))
    (torch.ops.engram_rs.host_gather(anchor, rows, handle) * upstream).sum().backward()
    want = w0.clone()
    want[1] -= 0.5 * 2
    want[4] -= 0.5
    # The update in float32, then rounded to the table's dtype (FP8: re-quantized per block).
    if dtype == "bfloat16":
        expect = want.to(torch.bfloat16).float()
    else:
        er.HostTable.create(tmp_path / "q.safetensors", ROWS, dim, dtype=dtype)
        scratch = er.HostTable.open(tmp_path / "q.safetensors", writable=True)
        scratch.write_rows(np.arange(ROWS), want.numpy())
        expect = torch.from_numpy(scratch.gather(np.arange(ROWS), out_dtype="float32").copy())
    torch.testing.assert_close(host_rows(table), expect, rtol=0, atol=0)


# opcheck's AOT test reads .grad of non-leaf tensors it makes: the same warning comes for a trivial
# custom op (x.clone()) in this torch version, so it is opcheck's, not these ops'.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_opcheck_passes_for_both_ops(tmp_path) -> None:
    table, _ = table_and_copy(tmp_path)
    # lr = 0: opcheck runs the backward several times and compares the forwards between them.
    handle = ops.register(table, SparseSGD(lr=0.0))
    anchor = torch.nn.Parameter(torch.empty(0))
    rows = torch.tensor([[3, 4], [4, 9]])
    torch.library.opcheck(torch.ops.engram_rs.host_gather.default, (anchor, rows, handle))
    grad = torch.randn(4, DIM)
    torch.library.opcheck(
        torch.ops.engram_rs.host_sparse_step.default, (rows.reshape(-1), grad, handle)
    )


def test_gradcheck_of_the_dense_gather_in_float64() -> None:
    """The table=None path (the demo's layout) in float64; the host path's gradient is checked
    exactly by test_sgd_applies_the_exact_gradient (a host table has no tensor to perturb)."""
    from engram_rs.torch import EngramEmbedding

    small = er.EngramConfig.preset("demo").replace(engram_vocab_size=[11, 13], n_embed_per_ngram=16)
    h = er.NgramHasher(small, 50, compressed_pad_id=2)
    emb = EngramEmbedding(h, 1, small.head_dim).double()
    ids = torch.from_numpy(h.hash(np.random.default_rng(0).integers(0, 50, (2, 5)))[1])
    weight = emb.multi_head_embedding.embedding.weight

    def f(w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(emb, {"multi_head_embedding.embedding.weight": w}, (ids,))

    assert torch.autograd.gradcheck(f, (weight.detach().clone().requires_grad_(),))


def test_backward_through_a_read_only_table_is_refused(tmp_path) -> None:
    table, _ = table_and_copy(tmp_path)
    path = table.path
    table.close()
    ro = er.HostTable.open(path, mode="mmap")
    handle = ops.register(ro, SparseSGD(lr=0.1))
    anchor = torch.nn.Parameter(torch.empty(0))
    out = torch.ops.engram_rs.host_gather(anchor, torch.tensor([1, 2]), handle)
    with pytest.raises(PermissionError, match="backward through a read-only table: open it"):
        out.sum().backward()
    no_opt = ops.register(ro, None)
    out = torch.ops.engram_rs.host_gather(anchor, torch.tensor([1, 2]), no_opt)
    with pytest.raises(RuntimeError, match="backward through a host table without an optimizer"):
        out.sum().backward()
    with torch.no_grad():  # inference needs neither
        assert torch.ops.engram_rs.host_gather(anchor, torch.tensor([1]), handle).shape == (1, 8)


def test_prefetched_rows_are_used_once(tmp_path) -> None:
    table, w0 = table_and_copy(tmp_path)
    handle = ops.register(table, None)
    anchor = torch.nn.Parameter(torch.empty(0))
    rows = torch.tensor([5, 7, 5])
    ops.prefetch(handle, rows)
    with torch.no_grad():
        got = torch.ops.engram_rs.host_gather(anchor, rows, handle)
        torch.testing.assert_close(got, w0[rows])
        ops.prefetch(handle, rows)  # a prefetch of other rows is waited for, then not used
        torch.testing.assert_close(
            torch.ops.engram_rs.host_gather(anchor, torch.tensor([1]), handle), w0[[1]]
        )


# ---- the modules over a host table -------------------------------------------------------------

from engram_rs.torch import Engram  # noqa: E402
from engram_rs.torch.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

C = 1000
SMALL = er.EngramConfig.preset("demo").replace(
    engram_vocab_size=[211, 223], n_embed_per_ngram=64, hidden_size=32, hc_mult=2
)


def host_and_dense(tmp_path, opt: object, name: str = "e") -> tuple[Engram, Engram]:
    """An Engram over a host table and a dense one with the same weights."""
    torch.manual_seed(0)
    dense = Engram(SMALL, 1, compressed_vocab_size=C)
    weight = dense.multi_head_embedding.embedding.weight.detach()
    path = tmp_path / f"{name}.safetensors"
    er.HostTable.create(path, weight.shape[0], weight.shape[1], dtype="float32")
    table = er.HostTable.open(path, writable=True)
    table.write_rows(np.arange(weight.shape[0]), weight.numpy())
    host = Engram(SMALL, 1, compressed_vocab_size=C, table=table, optimizer=opt)  # type: ignore[arg-type]
    missing = host.load_state_dict(
        {k: v for k, v in dense.state_dict().items() if "embedding.weight" not in k},
        strict=False,
    )
    assert missing.missing_keys == [] and missing.unexpected_keys == []
    return host, dense


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    h = er.NgramHasher(SMALL, C, compressed_pad_id=2)
    ids = np.random.default_rng(seed).integers(0, C, size=(2, 9))
    hidden = torch.randn(
        2, 9, SMALL.hc_mult, SMALL.hidden_size, generator=torch.Generator().manual_seed(seed)
    )
    return hidden, torch.from_numpy(h.hash(ids)[1])


def test_host_table_engram_equals_the_dense_one_and_trains_like_sgd(tmp_path) -> None:
    host, dense = host_and_dense(tmp_path, SparseSGD(lr=0.5))
    hidden, ids = inputs()
    torch.testing.assert_close(host(hidden, ids), dense(hidden, ids), rtol=1e-6, atol=1e-6)
    host(hidden, ids).square().sum().backward()  # the host table is updated here
    dense(hidden, ids).square().sum().backward()
    w = dense.multi_head_embedding.embedding.weight
    assert w.grad is not None
    want = (w - 0.5 * w.grad).detach()
    got = torch.from_numpy(host.multi_head_embedding.table.gather(np.arange(w.shape[0])).copy())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for (name, p), (_, q) in zip(
        host.named_parameters(), dense.named_parameters(), strict=False
    ):  # the dense parts get the same gradients
        if p.numel() and "embedding" not in name:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compile_fullgraph_with_a_host_table_matches_eager(tmp_path) -> None:
    host, _ = host_and_dense(tmp_path, SparseSGD(lr=0.0))
    hidden, ids = inputs(1)
    eager = host(hidden, ids)
    compiled = torch.compile(host, fullgraph=True)
    torch.testing.assert_close(compiled(hidden, ids), eager, rtol=1e-5, atol=1e-6)
    compiled(hidden, ids).sum().backward()  # the backward op runs inside the compiled graph


def test_prefetch_then_forward(tmp_path) -> None:
    host, dense = host_and_dense(tmp_path, None)
    hidden, ids = inputs(2)
    host.prefetch(ids)
    with torch.no_grad():
        torch.testing.assert_close(host(hidden, ids), dense(hidden, ids), rtol=1e-6, atol=1e-6)


def test_a_checkpoint_resumes_exactly(tmp_path) -> None:
    def run(model: Engram, opt: torch.optim.Optimizer, seeds: range) -> list[float]:
        out = []
        for s in seeds:
            hidden, ids = inputs(s)
            loss = model(hidden, ids).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    a, _ = host_and_dense(tmp_path, SparseAdam(lr=0.01), "a")
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3)
    whole = run(a, opt_a, range(6))
    b, _ = host_and_dense(tmp_path, SparseAdam(lr=0.01), "b")
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3)
    first = run(b, opt_b, range(3))
    save_checkpoint(tmp_path / "ck.safetensors", b, opt_b, config=SMALL, extra={"step": 3})
    c, _ = host_and_dense(tmp_path, SparseAdam(lr=0.01), "c")
    opt_c = torch.optim.AdamW(c.parameters(), lr=1e-3)
    assert load_checkpoint(tmp_path / "ck.safetensors", c, opt_c, config=SMALL) == {"step": 3}
    assert first + run(c, opt_c, range(3, 6)) == whole
    other = SMALL.replace(seed=5)
    with pytest.raises(ValueError, match=r"checkpoint of another Engram config \(seed differ"):
        load_checkpoint(tmp_path / "ck.safetensors", c, opt_c, config=other)
    with pytest.raises(ValueError, match="checkpoint of another tokenizer"):
        save_checkpoint(tmp_path / "t.safetensors", b, tokenizer_fingerprint="aaa")
        load_checkpoint(tmp_path / "t.safetensors", c, tokenizer_fingerprint="bbb")


def test_an_fp8_table_without_scales_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(10, 32).to(torch.float8_e4m3fn)}, str(tmp_path / "f8.safetensors"))
    with pytest.raises(ValueError, match=r'tensor "w" is FP8 and no single tensor w_scale or'):
        er.HostTable.open(tmp_path / "f8.safetensors")


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_attach_copy_hands_the_gradient_back_to_the_host_rows() -> None:
    """The op that makes a prefetch's GPU copy the differentiable result of the host rows (CPU
    to CPU here; tests/test_torch_cuda.py runs it across devices)."""
    host = torch.randn(6, 4, requires_grad=True)
    ahead = host.detach().clone()
    out = torch.ops.engram_rs.attach_copy(host, ahead)
    assert torch.equal(out, ahead) and out.data_ptr() != ahead.data_ptr()
    (out * 3).sum().backward()
    assert host.grad is not None and torch.equal(host.grad, torch.full((6, 4), 3.0))
    torch.library.opcheck(torch.ops.engram_rs.attach_copy.default, (host, ahead))


def test_a_checkpoint_keeps_an_fp8_table_byte_for_byte(tmp_path) -> None:
    table, _ = table_and_copy(tmp_path, "float8_e4m3")
    holder = torch.nn.Module()
    holder.table, holder.optimizer = table, None  # what host_tables() looks for

    def stored() -> tuple[bytes, bytes]:
        core = table._core
        return core.read_raw(0, ROWS).tobytes(), core.read_raw(0, ROWS, True).tobytes()

    before = stored()
    assert len(before[1]) == ROWS  # one UE8M0 scale byte per row of 32
    save_checkpoint(tmp_path / "f8.ckpt", holder)
    table.write_rows(np.arange(ROWS), np.ones((ROWS, 32), np.float32))
    assert stored() != before
    load_checkpoint(tmp_path / "f8.ckpt", holder)
    assert stored() == before
