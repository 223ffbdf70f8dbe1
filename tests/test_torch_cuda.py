"""Host tables feeding a GPU: pinned outputs copied without blocking, a prefetch overlapping GPU
work, and a training step with the dense part on the GPU and the table on the host. Skipped
cleanly where there is no GPU."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import engram_rs as er  # noqa: E402
from engram_rs.torch import Engram, SparseSGD, ops  # noqa: E402

C = 1000
SMALL = er.EngramConfig.preset("demo").replace(
    engram_vocab_size=[211, 223], n_embed_per_ngram=64, hidden_size=32, hc_mult=2
)


def _table(tmp_path, rows: int, dim: int) -> er.HostTable:
    path = tmp_path / "t.safetensors"
    er.HostTable.create(path, rows, dim, dtype="float32", seed=1)
    return er.HostTable.open(path, writable=True)


def test_gathered_rows_are_pinned_and_copied_without_blocking(tmp_path) -> None:
    table = _table(tmp_path, 1000, 64)
    handle = ops.register(table, None)
    anchor = torch.nn.Parameter(torch.empty(0))
    rows = torch.randint(0, 1000, (4096,))
    with torch.no_grad():
        out = torch.ops.engram_rs.host_gather(anchor, rows, handle)
    assert out.is_pinned()
    gpu = out.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    want = torch.from_numpy(table.gather(rows.numpy()))
    assert torch.equal(gpu.cpu(), want)


def test_a_prefetch_overlaps_a_gpu_matmul(tmp_path) -> None:
    model = Engram(SMALL, 1, compressed_vocab_size=C, table=None)
    weight = model.multi_head_embedding.embedding.weight.detach()
    table = _table(tmp_path, weight.shape[0], weight.shape[1])
    table.write_rows(np.arange(weight.shape[0]), weight.numpy())
    host = Engram(SMALL, 1, compressed_vocab_size=C, table=table).cuda()
    dense = model.cuda()
    host.load_state_dict(
        {k: v for k, v in dense.state_dict().items() if "embedding.weight" not in k}
    )
    ids = torch.from_numpy(
        er.NgramHasher(SMALL, C, compressed_pad_id=2).hash(
            np.random.default_rng(0).integers(0, C, (2, 64))
        )[1]
    ).cuda()
    hidden = torch.randn(2, 64, SMALL.hc_mult, SMALL.hidden_size, device="cuda")
    a = torch.randn(4096, 4096, device="cuda")
    host.prefetch(ids)  # the host gather and the copy to the GPU run while the GPU multiplies
    binding = ops.binding(host.multi_head_embedding._host_handle)
    assert binding.device_copy is not None  # the copy to the GPU was started
    for _ in range(4):
        a = a @ a / 64
    with torch.no_grad():
        torch.testing.assert_close(host(hidden, ids), dense(hidden, ids), rtol=1e-5, atol=1e-5)
    assert binding.device_copy is None  # and used by the forward


def test_a_training_step_with_the_table_on_the_host(tmp_path) -> None:
    torch.manual_seed(0)
    dense = Engram(SMALL, 1, compressed_vocab_size=C)
    weight = dense.multi_head_embedding.embedding.weight.detach().clone()
    table = _table(tmp_path, weight.shape[0], weight.shape[1])
    table.write_rows(np.arange(weight.shape[0]), weight.numpy())
    host = Engram(SMALL, 1, compressed_vocab_size=C, table=table, optimizer=SparseSGD(lr=0.5))
    host.load_state_dict(
        {k: v for k, v in dense.state_dict().items() if "embedding.weight" not in k}
    )
    host.cuda()
    ids = torch.from_numpy(
        er.NgramHasher(SMALL, C, compressed_pad_id=2).hash(
            np.random.default_rng(1).integers(0, C, (2, 9))
        )[1]
    )
    hidden = torch.randn(2, 9, SMALL.hc_mult, SMALL.hidden_size)
    host(hidden.cuda(), ids.cuda()).square().sum().backward()  # updates the host table
    dense(hidden, ids).square().sum().backward()
    g = dense.multi_head_embedding.embedding.weight.grad
    assert g is not None
    got = torch.from_numpy(table.gather(np.arange(weight.shape[0])).copy())
    torch.testing.assert_close(got, weight - 0.5 * g, rtol=1e-5, atol=1e-5)
