"""The card a device check runs on, and what the open issues' H200 figures mean on it.

Issues 14 and 15 state their floors at 4.3 TB/s (an H200's practical HBM rate) and their time targets as
measured on an H200. A lent machine may be another card (an H100 reads about 3 TB/s): there the weights and
logit rows take longer to stream whatever the code does. So bench/device_check.sh measures the card's read
rate once (`measure_read_tb_s`), computes every floor at the card's rate (`floor_tb_s`; on an H200, or
where nothing was measured, the issues' 4.3) and moves each time target by the difference of the two floors
(`card_limit`): the same overhead above the floor that the issue allows on an H200. Targets that are counts or
ratios (kernels, syncs, speed-ups, times over the floor) do not move. The verdict as written (against the
issue's own figure) is kept beside it.
"""
from __future__ import annotations

import statistics

ISSUE_TB_S = 4.3  # the H200 rate at which issues 14 and 15 state their floors and targets


def measure_read_tb_s(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """The card's read rate, TB/s: the median of `repeats` timed sums (CUDA events) of a float32 tensor of
    `nbytes`, after 3 untimed ones. A sum reads every byte once and writes one number: the rate a stream of
    weights or logit rows can reach, not the data sheet's peak."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    for _ in range(3):
        x.sum()
    ms = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum()
        end.record()
        end.synchronize()
        ms.append(start.elapsed_time(end))
    del x
    torch.cuda.empty_cache()
    return nbytes / (statistics.median(ms) * 1e-3) / 1e12


def is_h200(env: dict) -> bool:
    return "H200" in str(env.get("gpu") or "")


def floor_tb_s(env: dict) -> float:
    """The rate every floor of the check is computed at: the card's measured rate, except on an H200 (where the
    issues' 4.3 TB/s is the figure their targets were set with) or where no rate was measured."""
    rate = env.get("read_tb_s")
    if is_h200(env) or not isinstance(rate, (int, float)) or rate <= 0:
        return ISSUE_TB_S
    return float(rate)


def card_limit(limit: float, floor: float | None, env: dict) -> float:
    """A time target (µs or ms, as `floor`) of the issues, moved to this card: `floor` is the row's floor at the
    check's rate (floor_tb_s); the same bytes at the issues' 4.3 TB/s would take floor * rate / 4.3, and the
    target moves by the difference. Unchanged on an H200, without a measured rate, or without a floor."""
    rate = floor_tb_s(env)
    if floor is None or rate == ISSUE_TB_S:
        return limit
    return limit + floor * (1 - rate / ISSUE_TB_S)


def card_rate_limit(limit: float, batch: int, floor_ms: float | None, env: dict) -> float:
    """A tokens-per-second target at `batch` rows, moved as `card_limit` moves the step time it implies."""
    step_ms = card_limit(batch / limit * 1e3, floor_ms, env)
    return batch / step_ms * 1e3


if __name__ == "__main__":  # device_check.sh: the floors' rate for this environment.json
    import json
    import sys

    try:
        env = json.load(open(sys.argv[1]))
    except (OSError, ValueError):  # the environment step wrote nothing (skipped, killed)
        env = {}
    print(floor_tb_s(env))
