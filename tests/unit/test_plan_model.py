"""The planner's arithmetic on hand-computed cases (McCandlish et al. 2018; the alpha-beta model).

- one run pins S(B) = S_min (1 + B_crit / B): S_min = S0 / (1 + B_crit / B0), E_min = S_min B_crit;
- E(B) = E_min (1 + B / B_crit);
- step time = compute(B / N) + (1 - overlap) x all-reduce(N); efficiency = T(B, 1) / (N T(B, N));
- `best` is the fastest row, `best_efficient` the fastest at >= 80 % efficiency.
"""

import pytest

from bigbatch.distributed import alphabeta
from bigbatch.study.plan_model import (
    ComputeModel,
    CommModel,
    Tradeoff,
    choose_best,
    default_batches,
    noise_near_target,
    overlap_from_scaling,
    plan_rows,
    step_time,
)

COMPUTE = ComputeModel(overhead_s=1e-3, per_example_s=1e-4)
COMM = CommModel(grad_bytes=1e6, alpha_s=1e-4, beta_bytes_per_s=1e9)


def test_one_run_pins_the_steps_examples_tradeoff():
    t = Tradeoff.from_run(steps=400, batch=100, b_crit=300)
    assert t.s_min == pytest.approx(100.0)  # 400 / (1 + 300/100)
    assert t.e_min == pytest.approx(30_000.0)
    assert t.steps(100) == pytest.approx(400.0)  # through the measured point
    assert t.steps(300) == pytest.approx(200.0)  # S(B_crit) = 2 S_min
    assert t.steps(600) == pytest.approx(150.0)
    assert t.examples(600) == pytest.approx(90_000.0)  # E_min (1 + 600/300)
    assert t.examples(30) == pytest.approx(33_000.0)  # E_min (1 + 0.1): small batches cost ~E_min
    with pytest.raises(ValueError):
        Tradeoff.from_run(steps=400, batch=100, b_crit=0)


def test_compute_model_fits_overhead_and_time_per_example():
    m = ComputeModel.fit([10, 20, 40], [0.002, 0.003, 0.005])
    assert m.overhead_s == pytest.approx(1e-3) and m.per_example_s == pytest.approx(1e-4)
    assert m.step_s(100) == pytest.approx(0.011)
    # a negative intercept (timing noise) is refitted through the origin
    m = ComputeModel.fit([10, 20], [0.0009, 0.0021])
    assert m.overhead_s == 0.0 and m.per_example_s > 0
    # a negative slope (noise at tiny batches) leaves a constant
    m = ComputeModel.fit([16, 64], [0.004, 0.002])
    assert m.per_example_s == 0.0 and 0.002 < m.overhead_s < 0.004
    with pytest.raises(ValueError):
        ComputeModel.fit([16, 16], [0.1, 0.1])


def test_allreduce_times_are_the_alpha_beta_formulas():
    assert COMM.allreduce_s("ring", 1) == 0.0
    assert COMM.allreduce_s("ring", 2) == pytest.approx(2 * 1e-4 + 1e6 / 1e9)
    assert COMM.allreduce_s("torus2d", 64) == pytest.approx(alphabeta.torus_time(8, 8, 1e6, 1e-4, 1e9))
    # 64 devices, 8 per node: tree in the node (3 rounds each way) + ring over 8 leaders
    assert COMM.allreduce_s("hierarchical", 64) == pytest.approx(6 * (1e-4 + 1e-3) + alphabeta.ring_time(8, 1e6, 1e-4, 1e9))
    algo, t = COMM.fastest(4096)
    assert algo == "torus2d" and t < COMM.allreduce_s("ring", 4096)
    with pytest.raises(ValueError, match="unknown all-reduce algorithm"):
        COMM.allreduce_s("butterfly", 4)


def test_step_time_adds_the_exposed_part_of_the_allreduce():
    t = step_time(256, 2, COMPUTE, COMM, ["ring"], overlap=0.5)
    assert t["per_device_batch"] == 128
    assert t["compute_s"] == pytest.approx(1e-3 + 128e-4)
    assert t["comm_s"] == pytest.approx(0.5 * 1.2e-3)
    assert t["step_s"] == pytest.approx(0.0138 + 0.0006)
    assert step_time(256, 1, COMPUTE, COMM, ["ring"])["comm_s"] == 0.0
    # overlap from a scaling run: 0.3 ms exposed of a modelled 1.2 ms -> 75 % hidden
    assert overlap_from_scaling(0.3e-3, 2, COMM) == pytest.approx(0.75)
    assert overlap_from_scaling(5e-3, 2, COMM) == 0.0  # more exposed than modelled: none hidden


def test_table_and_the_choice_of_best_on_a_hand_computed_case():
    t = Tradeoff(s_min=100.0, b_crit=300.0)
    rows = plan_rows(t, COMPUTE, COMM, batches=[100, 300], worlds=[1, 2], algos=["ring"])
    got = {(r["global_batch"], r["world_size"]): r for r in rows}
    # B = 100: 400 steps; 1 device 11 ms/step; 2 devices 1 + 5 ms compute + 1.2 ms ring
    assert got[100, 1]["time_s"] == pytest.approx(400 * 0.011)
    assert got[100, 2]["step_s"] == pytest.approx(0.0072)
    assert got[100, 2]["time_s"] == pytest.approx(2.88)
    assert got[100, 2]["efficiency"] == pytest.approx(0.011 / (2 * 0.0072))  # 0.764
    # B = 300: 200 steps; 31 ms on one device, 17.2 ms on two
    assert got[300, 2]["time_s"] == pytest.approx(200 * 0.0172)
    assert got[300, 2]["efficiency"] == pytest.approx(0.031 / (2 * 0.0172))  # 0.901
    assert got[300, 2]["examples"] == pytest.approx(60_000.0)
    assert got[300, 2]["examples_over_e_min"] == pytest.approx(2.0)
    # fastest overall is B = 100 on 2 devices (2.88 s) at 76 % efficiency; the fastest at >= 80 % is
    # B = 300 on 2 devices (3.44 s), ahead of B = 100 on 1 device (4.4 s)
    assert (choose_best(rows)["global_batch"], choose_best(rows)["world_size"]) == (100, 2)
    best_eff = choose_best(rows, 0.8)
    assert (best_eff["global_batch"], best_eff["world_size"]) == (300, 2)
    assert choose_best([r for r in rows if r["world_size"] == 2], 0.95) is None


def test_rows_need_one_example_per_device_and_ties_go_to_fewer_devices():
    rows = plan_rows(Tradeoff(10.0, 100.0), COMPUTE, COMM, batches=[4, 64], worlds=[1, 8, 64], algos=["ring"])
    assert {(r["global_batch"], r["world_size"]) for r in rows} == {(4, 1), (64, 1), (64, 8), (64, 64)}
    free = CommModel(grad_bytes=0.0, alpha_s=0.0, beta_bytes_per_s=1e9)
    flat = plan_rows(Tradeoff(10.0, 100.0), ComputeModel(1e-3, 0.0), free, batches=[64], worlds=[1, 8])
    assert choose_best(flat)["world_size"] == 1  # same time on 1 and 8 devices


def test_noise_scale_is_taken_near_the_target_not_averaged():
    history = [(50, 100.0), (100, 150.0), (150, 200.0), (200, 300.0), (250, 400.0)]
    n = noise_near_target(history, target_step=230)
    assert n["value"] == 300.0 and n["last"] == 300.0 and n["step"] == 200  # nothing after the target
    assert n["window_start_step"] == 150 and n["moved_ratio"] == pytest.approx(1.5)
    assert (n["min"], n["max"]) == (300.0, 300.0)
    # the median of the last quarter [300, 400]: one EMA spike does not move it, early values do not count
    spiky = [(s, 100.0) for s in range(10, 300, 10)] + [(300, 500.0), (310, 2000.0), (320, 520.0), (330, 510.0), (400, 530.0)]
    n = noise_near_target(spiky, target_step=400)
    assert n["value"] == 520.0 and n["last"] == 530.0 and n["max"] == 2000.0 and n["window_points"] == 5
    assert n["window_start_step"] == 300 and n["moved_ratio"] == pytest.approx(520 / 500)
    with pytest.raises(ValueError):
        noise_near_target([(300, 5.0)], target_step=230)


def test_default_batches_span_small_batches_to_past_b_crit_and_the_largest_world():
    b = default_batches(128, 500.0, 4096)
    assert b[0] == 8 and b[-1] == 16384 and all(y == 2 * x for x, y in zip(b, b[1:]))
