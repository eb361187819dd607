"""The alpha-beta model and the benchmark's arithmetic, as pure functions.

- the ring formula is nccl-tests' 2(n-1) alpha + 2(n-1)/n S/beta;
- the 2D torus moves the ring's bytes in 2(X-1) + 2(Y-1) latency steps (Mikami et al. 2018);
- the fit recovers alpha and beta from synthetic bench rows;
- busbw = algbw * 2(n-1)/n; sizes parse like nccl-tests' -b/-e/-f 2.
"""

import math

import pytest

from bigbatch.distributed import alphabeta, bench
from bigbatch.study import scaling
from bigbatch.errors import UsageError

ALPHA, BETA = 25e-6, 10e9


def test_ring_time_is_the_nccl_tests_formula():
    assert alphabeta.ring_time(8, 1e8, ALPHA, BETA) == pytest.approx(14 * ALPHA + 2 * 7 / 8 * 1e8 / BETA)
    assert alphabeta.ring_time(1, 1e8, ALPHA, BETA) == 0.0


def test_torus_moves_ring_bytes_in_fewer_latency_steps():
    for rows, cols in ((2, 4), (32, 68), (64, 64)):
        n = rows * cols
        assert alphabeta.latency_steps("torus2d", n, rows=rows) == 2 * (cols - 1) + 2 * (rows - 1)
        # with alpha = 0 only bytes count: the torus equals the flat ring
        assert alphabeta.torus_time(rows, cols, 1e8, 0.0, BETA) == pytest.approx(alphabeta.ring_time(n, 1e8, 0.0, BETA))
        # with beta = inf only steps count
        assert alphabeta.torus_time(rows, cols, 1e8, ALPHA, math.inf) == pytest.approx((2 * (cols - 1) + 2 * (rows - 1)) * ALPHA)
    # a 1 x n torus is the ring
    assert alphabeta.torus_time(1, 16, 1e6, ALPHA, BETA) == pytest.approx(alphabeta.ring_time(16, 1e6, ALPHA, BETA))


def test_hierarchical_is_tree_reduce_leader_ring_tree_broadcast():
    t = alphabeta.hierarchical_time(64, 8, 1e6, ALPHA, BETA, alpha_intra=1e-6, beta_intra=100e9)
    assert t == pytest.approx(2 * 3 * (1e-6 + 1e6 / 100e9) + alphabeta.ring_time(8, 1e6, ALPHA, BETA))
    assert alphabeta.latency_steps("hierarchical", 64, local=8) == 6 + 14


def test_fit_recovers_alpha_and_beta_from_synthetic_rows():
    rows = [{"algo": "ring", "world_size": n, "bytes": s, "time_us": alphabeta.ring_time(n, s, ALPHA, BETA) * 1e6}
            for n in (2, 4) for s in (8, 1 << 12, 1 << 20, 1 << 26)]
    fit = alphabeta.fit_alpha_beta(rows + [{"algo": "builtin", "world_size": 4, "bytes": 8, "time_us": 1.0}])
    assert fit["alpha_s"] == pytest.approx(ALPHA, rel=1e-6)
    assert fit["beta_bytes_per_s"] == pytest.approx(BETA, rel=1e-6)
    assert fit["points"] == 8 and fit["max_rel_err"] < 1e-6
    with pytest.raises(UsageError, match="--bench"):
        alphabeta.fit_alpha_beta(rows[:1])


def test_predictions_cover_8_to_4096_ranks_and_torus_wins_at_scale():
    table = alphabeta.predict(1e8, ALPHA, BETA)
    assert [r["world_size"] for r in table] == [2 ** k for k in range(3, 13)]
    big = table[-1]
    assert big["grid"] == "64x64" and big["ring_steps"] == 8190 and big["torus2d_steps"] == 252
    assert big["torus2d_ms"] < big["ring_ms"]


def test_efficiency_is_throughput_over_n_times_one_rank():
    rows = scaling.efficiency_rows([
        {"world_size": 2, "global_batch": 256, "step_s": 0.02, "compute_s": 0.01, "comm_s": 0.01},
        {"world_size": 1, "global_batch": 128, "step_s": 0.01, "compute_s": 0.01, "comm_s": 0.0},
    ])
    assert [r["world_size"] for r in rows] == [1, 2]
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    assert rows[1]["efficiency"] == pytest.approx(0.5)
    assert rows[1]["comm_fraction"] == pytest.approx(0.5)


def test_busbw_and_sizes():
    row = bench.make_row("ring", 4, "fp32", 1 << 20, 1e-3, True)
    assert row["algbw_gbps"] == pytest.approx((1 << 20) / 1e-3 / 1e9, rel=1e-3)
    assert row["busbw_gbps"] == pytest.approx(row["algbw_gbps"] * 1.5, rel=1e-3)
    assert bench.parse_sizes("8,1K,64M,1g") == [8, 1024, 64 << 20, 1 << 30]
    assert bench.parse_sizes("1K:8K") == [1024, 2048, 4096, 8192]
    for bad in ("12Q", "", "0", "-5", "8K:1K"):
        with pytest.raises(UsageError, match="--sizes"):
            bench.parse_sizes(bad)
    with pytest.raises(UsageError, match="--algo"):
        bench.parse_algos("ring,tree")
    assert bench.parse_algos("all") == list(bench.ALGOS)
