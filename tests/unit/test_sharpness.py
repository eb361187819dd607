"""Sharpness: Lanczos on Hessian-vector products finds the known top eigenvalues."""

import pytest
import torch

from bigbatch.errors import UsageError
from bigbatch.measure.sharpness import hessian_top_eigs


def least_squares(n=200, d=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # anisotropic inputs so the eigenvalues are well separated
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.linspace(3.0, 0.1, d, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(d, 1, bias=False).double()
    loss_fn = lambda out, t: 0.5 * ((out.squeeze(-1) - t) ** 2).mean()  # noqa: E731
    hessian = x.T @ x / n  # exact Hessian of the mean squared error / 2
    return model, loss_fn, x, y, torch.linalg.eigvalsh(hessian).flip(0)


@pytest.mark.parametrize("k", [1, 3])
def test_top_eigenvalues_of_least_squares_within_one_percent(k):
    model, loss_fn, x, y, eigs = least_squares()
    got = hessian_top_eigs(model, loss_fn, x, y, k=k, iters=100, tol=1e-6)
    assert len(got) == k
    for g, want in zip(got, eigs[:k].tolist()):
        assert g == pytest.approx(want, rel=0.01)


def test_an_mlp_top_eigenvalue_matches_the_dense_hessian():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,))
    loss_fn = torch.nn.functional.cross_entropy
    params = list(model.parameters())
    shapes = [p.shape for p in params]

    def loss_of(flat):
        chunks, i = [], 0
        for s in shapes:
            chunks.append(flat[i:i + s.numel()].reshape(s))
            i += s.numel()
        out = torch.func.functional_call(model, {n: c for (n, _), c in zip(model.named_parameters(), chunks)}, (x,))
        return loss_fn(out, y)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    dense = torch.autograd.functional.hessian(loss_of, flat)
    want = torch.linalg.eigvalsh(dense).flip(0)[:2].tolist()
    got = hessian_top_eigs(model, loss_fn, x, y, k=2, iters=flat.numel(), tol=1e-8)
    assert got == pytest.approx(want, rel=0.01)


def test_k_larger_than_the_parameter_count_is_a_usage_error():
    model, loss_fn, x, y, _ = least_squares(d=4)
    with pytest.raises(UsageError, match="number of parameters \\(4\\)"):
        hessian_top_eigs(model, loss_fn, x, y, k=5)


def test_the_operator_is_one_symmetric_matrix_over_micro_batches_even_with_dropout():
    """Each product re-walks the micro-batches (memory of one micro-batch); the dropout masks are
    replayed, so u.Hv = v.Hu and the products are the mean of the micro-batches' Hessians."""
    from bigbatch.measure.modes import measuring
    from bigbatch.measure.sharpness import HessianOperator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)).double()
    x, y = torch.randn(96, 6, dtype=torch.float64), torch.randint(0, 3, (96,))
    with measuring(model, "train"):
        op = HessianOperator(model, torch.nn.functional.cross_entropy, x, y, micro_batch=32)
        u, v = torch.randn(op.num_params, dtype=torch.float64), torch.randn(op.num_params, dtype=torch.float64)
        assert float(u @ op.hvp(v)) == pytest.approx(float(v @ op.hvp(u)), rel=1e-9)
        assert torch.equal(op.hvp(v), op.hvp(v))
    assert op.examples == 96 and len(op.chunks) == 3 and op.hvps == 4


def test_hvps_go_through_attention_whose_fused_kernels_have_no_double_backward():
    """The tiny GPT's scaled_dot_product_attention: an HVP takes the math kernel (the fused CPU/CUDA
    kernels raise "derivative ... not implemented" on the second backward); H stays symmetric and
    matches a finite difference of gradients."""
    from bigbatch.measure.modes import measuring
    from bigbatch.measure.sharpness import HessianOperator
    from bigbatch.trainer.gpt import build_gpt
    from bigbatch.trainer.objective import TrainingLoss

    torch.manual_seed(0)
    model = build_gpt((8,), 16, {"layers": 1, "width": 16, "heads": 2}).double()
    x, y = torch.randint(0, 16, (12, 8)), torch.randint(0, 16, (12, 8))
    loss_fn = TrainingLoss()
    with measuring(model, "train"):
        op = HessianOperator(model, loss_fn, x, y, micro_batch=6)
        u, v = torch.randn(op.num_params, dtype=torch.float64), torch.randn(op.num_params, dtype=torch.float64)
        hv = op.hvp(v)
        assert float(u @ hv) == pytest.approx(float(v @ op.hvp(u)), rel=1e-8)
        params = [p for p in model.parameters() if p.requires_grad]

        def grad_at(shift):
            with torch.no_grad():
                offset = 0
                for p in params:
                    p.add_(shift[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
            g = torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(
                (loss_fn(model(x[:6]), y[:6]) + loss_fn(model(x[6:]), y[6:])) / 2, params)])
            return g

        h = 1e-5
        fd = (grad_at(h * v) - grad_at(-2 * h * v)) / (2 * h)
        grad_at(h * v)  # back to where it was
    assert torch.allclose(fd, hv, rtol=1e-4, atol=1e-6)
