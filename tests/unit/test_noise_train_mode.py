"""The noise scale of the loss that is trained (McCandlish et al. 2018, section 2.2).

- On a BatchNorm CNN, the train-mode B_simple from K micro-batch gradients agrees with a
  brute-force computation over many more micro-batch gradients, and differs from the eval-mode
  per-example value (a different loss).
- B_noise = tr(H Sigma)/(G^T H G) from micro-batch gradients and HVPs equals the same ratio
  computed with the dense Hessian and the dense per-example covariance.
- Measuring restores BatchNorm buffers, the module's mode and the RNG.
"""

import pytest
import torch
from torch import nn

from bigbatch.measure.modes import measuring
from bigbatch.measure.noise import per_sample_stats
from bigbatch.measure.train_mode import train_mode_noise
from bigbatch.measure.sharpness import HessianOperator, hessian_top_eigs

B = 16  # the training micro-batch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # thousands of tiny backward passes: two threads on two shared cores are ~15x slower than one
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bn_cnn() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 24)), nn.Conv1d(1, 6, 5, stride=2, padding=2, bias=False), nn.BatchNorm1d(6),
                         nn.ReLU(), nn.Conv1d(6, 6, 5, stride=2, padding=2, bias=False), nn.BatchNorm1d(6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(36, 4))


@pytest.fixture(scope="module")
def trained_bn_cnn(one_thread):
    """A BN CNN trained with SGD at micro-batch B on a teacher task whose inputs carry a random
    common-mode offset per example, so a micro-batch's statistics are noisy (as in real data,
    where BatchNorm's batch statistics differ from the running ones)."""
    gen = torch.Generator().manual_seed(0)
    n = 4096
    z = torch.randn(n, 24, generator=gen)
    teacher = torch.randn(24, 4, generator=gen)
    y = (z @ teacher + 0.3 * torch.randn(n, 4, generator=gen)).argmax(1)
    x = z + 2.0 * torch.randn(n, 1, generator=gen)
    torch.manual_seed(0)
    model = bn_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    for _ in range(300):
        idx = torch.randint(0, n, (B,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    return model, loss_fn, x, y


def draws(n: int, count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=gen)[:B] for _ in range(count)]


def test_train_mode_b_simple_matches_brute_force_and_differs_from_eval_mode(trained_bn_cnn):
    model, loss_fn, x, y = trained_bn_cnn
    # brute force, written plainly: many independent micro-batch gradients in train mode
    trained_state = {k: v.clone() for k, v in model.state_dict().items()}  # its forwards move the BN running stats
    model.train()
    params = list(model.parameters())
    rows = []
    for idx in draws(len(x), 4500, seed=1):
        grads = torch.autograd.grad(loss_fn(model(x[idx]), y[idx]), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    g = torch.stack(rows)
    mean = g.mean(0)
    cov_trace = ((g - mean) ** 2).sum() / (len(g) - 1)  # tr Cov(G_b)
    brute_trace_sigma = B * float(cov_trace)
    brute_grad_sq = float(mean @ mean) - float(cov_trace) / len(g)
    brute = brute_trace_sigma / brute_grad_sq
    model.load_state_dict(trained_state)

    got = train_mode_noise(model, loss_fn, ((x[i], y[i]) for i in draws(len(x), 1500, seed=2)))
    assert got.bn_mode == "train" and got.micro_batch == B and got.samples == 1500
    assert got.trace_sigma == pytest.approx(brute_trace_sigma, rel=0.10)
    assert got.b_simple == pytest.approx(brute, rel=0.10)

    # eval mode (running statistics): a per-example gradient of a different loss, asked for by name
    with pytest.raises(ValueError, match="BatchNorm"):
        per_sample_stats(model, loss_fn, x[:512], y[:512])
    # exact over the whole data set (the population the micro-batches are drawn from)
    e_grad_sq, e_trace = per_sample_stats(model, loss_fn, x, y, eval_batchnorm=True)
    eval_b_simple = e_trace / e_grad_sq
    print(f"B_simple train mode {got.b_simple:.1f} (brute force {brute:.1f}), eval mode {eval_b_simple:.1f}")
    assert abs(eval_b_simple / brute - 1) > 0.1
    assert model.training  # the module's mode is back


def test_measuring_restores_batchnorm_buffers_mode_and_rng(trained_bn_cnn):
    model, loss_fn, x, y = trained_bn_cnn
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    want_next = torch.rand(3)
    torch.manual_seed(7)
    m = train_mode_noise(model, loss_fn, ((x[i], y[i]) for i in draws(len(x), 8, seed=4)),
                         hessian=None)
    with measuring(model, "train"):
        op = HessianOperator(model, loss_fn, x[:64], y[:64], micro_batch=B)
        op.top_eigs(k=1, iters=5)
    hessian_top_eigs(model, loss_fn, x[:64], y[:64], iters=5, micro_batch=B)
    assert torch.equal(torch.rand(3), want_next)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert m.samples == 8
    model.train()


def test_sharpness_in_train_mode_differs_from_eval_mode_only_by_the_batchnorm_statistics(trained_bn_cnn):
    model, loss_fn, x, y = trained_bn_cnn
    train = hessian_top_eigs(model, loss_fn, x[:512], y[:512], iters=30, micro_batch=B)[0]
    again = hessian_top_eigs(model, loss_fn, x[:512], y[:512], iters=30, micro_batch=B)[0]
    evaluated = hessian_top_eigs(model, loss_fn, x[:512], y[:512], iters=30, mode="eval")[0]
    assert train == pytest.approx(again, rel=1e-6)  # deterministic: nothing leaked between calls
    assert train > 0 and evaluated > 0 and train != pytest.approx(evaluated, rel=1e-3)
    with pytest.raises(ValueError, match="mode"):
        hessian_top_eigs(model, loss_fn, x[:64], y[:64], mode="test")


def flat_loss(model, loss_fn, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(flat):
        chunks, i = {}, 0
        for name, s in zip(names, shapes):
            chunks[name] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        return loss_fn(torch.func.functional_call(model, chunks, (x,)), y)

    return f


def dense_mlp_problem():
    """A 38-parameter MLP on 512 examples: (model, loss_fn, x, y, dense Hessian H, dense
    per-example covariance Sigma, mean gradient G, generator for the draws)."""
    gen = torch.Generator().manual_seed(5)
    n = 512
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] ** 2 + 0.8 * torch.randn(n, generator=gen, dtype=torch.float64) > 0.5).long()
    y = y + (x[:, 2] > 1.0).long()  # three classes
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    loss_fn = nn.functional.cross_entropy
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    H = torch.autograd.functional.hessian(flat_loss(model, loss_fn, x, y), flat)
    per_example = torch.func.vmap(torch.func.grad(lambda f, xi, yi: flat_loss(model, loss_fn, xi[None], yi[None])(f)),
                                  in_dims=(None, 0, 0))(flat, x, y)
    G = per_example.mean(0)
    Sigma = (per_example - G).T @ (per_example - G) / n  # the population covariance of one draw
    return model, loss_fn, x, y, H, Sigma, G, gen


def test_b_noise_equals_the_dense_hessian_ratio():
    """B_noise = tr(H Sigma)/(G^T H G) with H the dense Hessian of the loss over the data set and
    Sigma the dense per-example covariance; the estimator only sees K micro-batch gradients of
    b examples (drawn with replacement) and HVPs."""
    model, loss_fn, x, y, H, Sigma, G, gen = dense_mlp_problem()
    n, b = len(x), 4
    exact_b_noise = float(torch.trace(H @ Sigma) / (G @ H @ G))
    exact_b_simple = float(torch.trace(Sigma) / (G @ G))

    batches = [torch.randint(0, n, (b,), generator=gen) for _ in range(4000)]
    op = HessianOperator(model, loss_fn, x, y)  # the whole data set: independent of the draws
    got = train_mode_noise(model, loss_fn, ((x[i], y[i]) for i in batches), hessian=op)
    print(f"B_noise {got.b_noise:.2f} (dense {exact_b_noise:.2f}); B_simple {got.b_simple:.2f} (dense {exact_b_simple:.2f})")
    assert got.bn_mode == "none" and got.hessian_examples == n
    assert got.b_noise == pytest.approx(exact_b_noise, rel=0.10)
    assert got.trace_h_sigma == pytest.approx(float(torch.trace(H @ Sigma)), rel=0.10)
    assert got.b_simple == pytest.approx(exact_b_simple, rel=0.10)
    assert abs(exact_b_noise / exact_b_simple - 1) > 0.1  # H is not isotropic: the two differ
    # HVPs on the first M = 1000 gradients only, each dotted with all K: the same ratio
    fewer = train_mode_noise(model, loss_fn, ((x[i], y[i]) for i in batches), hessian=op, hessian_samples=1000)
    assert fewer.hessian_samples == 1000 and fewer.b_noise == pytest.approx(exact_b_noise, rel=0.10)


def test_micro_batches_must_share_one_size_and_be_at_least_two():
    model = nn.Linear(2, 2)
    x, y = torch.randn(8, 2), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="same size"):
        train_mode_noise(model, nn.functional.cross_entropy, [(x[:4], y[:4]), (x[:3], y[:3])])
    with pytest.raises(ValueError, match="at least 2"):
        train_mode_noise(model, nn.functional.cross_entropy, [(x[:4], y[:4])])


def test_b_noise_with_one_fresh_hessian_micro_batch_per_hvp_equals_the_dense_ratio():
    """H_a on one independent micro-batch per HVP: E[H_a] = H, independent of the gradients, so
    the same estimators stay unbiased (measure.train_mode, `hessian_batches`)."""
    model, loss_fn, x, y, H, Sigma, G, gen = dense_mlp_problem()
    n, b = len(x), 4
    exact_b_noise = float(torch.trace(H @ Sigma) / (G @ H @ G))
    batches = [torch.randint(0, n, (b,), generator=gen) for _ in range(4000)]
    h_batches = [torch.randint(0, n, (b,), generator=gen) for _ in range(4000)]
    got = train_mode_noise(model, loss_fn, ((x[i], y[i]) for i in batches),
                           hessian_batches=((x[i], y[i]) for i in h_batches))
    print(f"B_noise {got.b_noise:.2f} +- {got.se['b_noise']:.2f} (dense {exact_b_noise:.2f})")
    assert got.hessian_samples == 4000 and got.hessian_examples == 4000 * b
    assert got.b_noise == pytest.approx(exact_b_noise, rel=0.10)
    low, high = got.interval("b_noise")
    assert low <= exact_b_noise <= high
