"""torchrun support: the rank of this process, and a gloo group used only for the final barrier.

Under `torchrun --nproc-per-node N` (one or several hosts) every rank generates its own shard into
its own part file; no tensors cross processes. The group exists so that rank 0 can merge the parts
once every rank is done; without torchrun's rendezvous variables, ranks run independently and the
parts are merged with `rsd merge`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .manifest import forced_runs_note
from .records import OutputBusy, describe_duplicates, part_path, read_records
from .parts import describe_forced_runs, describe_unfinished, merge_parts, note_unmerged
from .output_paths import check_not_input, check_output_name, check_writable


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Dist":
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK (one process when unset)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise ValueError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} and WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
        return cls(rank, world, local)

    @property
    def tag(self) -> str:
        return f"[rank {self.rank}/{self.world_size}] " if self.world_size > 1 else ""


def rank_target(out: Path, dist: Dist) -> Path:
    """The file this rank writes for `out`: its part under torchrun, else `out` itself."""
    return part_path(out, dist.rank, dist.world_size) if dist.world_size > 1 else out


def output_target(out: str, data: str, dist: Dist) -> tuple[Path, Path]:
    """--out as a path and the file this rank writes for it, both checked against --data and for writing."""
    out = Path(out)
    target = rank_target(out, dist)
    check_output_name(out)
    check_not_input({"--data": data}, {"--out": out, "its part": target})
    check_writable(target)
    return out, target


def init_process_group(dist: Dist, log) -> bool:
    """gloo, only for the final barrier; skipped when torchrun's rendezvous variables are missing."""
    if dist.world_size == 1:
        return False
    import torch.distributed as td

    if not td.is_available() or not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        log(f"{dist.tag}no MASTER_ADDR/MASTER_PORT: ranks run independently, merge the parts yourself")
        return False
    if not td.is_initialized():
        from datetime import timedelta

        # Ranks may finish hours apart: the barrier must outwait the slowest shard.
        td.init_process_group("gloo", timeout=timedelta(days=7))
    return True


def barrier_and_merge(dist: Dist, out: Path, log, reports: list | None = None) -> str | None:
    """Wait for every rank, then (rank 0) merge the parts into `out`; returns why they were not merged (None when
    they were, and on the other ranks). The merge's report is appended to `reports`: the command's exit status
    counts the files of stopped runs it joined, as `rsd merge`'s does (cli._merged_shortfalls)."""
    import torch.distributed as td

    try:
        td.barrier()
    except RuntimeError as err:  # a rank gone (killed, its host down): its part stays as it left it
        log(f"{dist.tag}not merged: a rank left before the end ({str(err).splitlines()[0][:200]}); rerun that rank "
            f"(it resumes), then: rsd merge {out}")
        return "a rank left before the end"
    if dist.rank != 0:
        return None
    try:
        report = merge_parts(out)
    except FileNotFoundError as err:  # parts on other hosts' disks
        log(f"not merged ({err}); once all parts are in one folder: rsd merge {out}")
        return str(err)
    except (ValueError, OutputBusy) as err:  # other settings, copies that differ, a part still written
        log(f"not merged: {err}")
        return str(err).splitlines()[0]
    statuses = [r.get("status") for r in read_records(out)]
    counts = ", ".join(f"{k}: {statuses.count(k)}" for k in ("solved", "prefix", "unverified"))
    counts = f" ({counts})" if any(statuses) else ""  # only rsd generate records have a status
    log(f"merged {report.parts} parts: {report.records} records{counts} in {out}")
    if reports is not None:
        reports.append(report)
    if report.unfinished:
        log(describe_unfinished(report))
    if report.forced_runs:  # earlier runs' (this one's each rank noted itself), as rsd merge notes them
        log(describe_forced_runs(report))
    if report.duplicates:
        log(f"warning: {describe_duplicates(report.duplicates)}; kept the first copy of each")
    return None


def log_report(dist: Dist, report: str, target: Path, log) -> None:
    """A run's report, each line under this rank's tag, then the warning of runs `target` took under --force."""
    log("\n".join(dist.tag + line for line in report.splitlines()))
    mixed = forced_runs_note(target)
    if mixed:
        log(dist.tag + mixed)


def merge_or_note(dist: Dist, group: bool, outputs: dict[Path, dict], summary: dict, log) -> None:
    """After a run, for each output (mapped to its records held in part files, `held_elsewhere`): merge the parts
    (a process group; `summary["not_merged"]` says why not, `summary["merge_reports"]` what was merged), say how to
    (ranks without one), or name the parts left."""
    if group:
        reports = summary.setdefault("merge_reports", [])
        reasons = [barrier_and_merge(dist, out, log, reports) for out in outputs]
        summary["not_merged"] = next((why for why in reversed(reasons) if why), reasons[0])  # the last one given
    elif dist.world_size > 1:
        log(f"{dist.tag}part written; when every rank is done: " + " and ".join(f"rsd merge {out}" for out in outputs))
    else:
        for out, elsewhere in outputs.items():
            note_unmerged(out, elsewhere, log)


def rank_device(device: str, dist: Dist) -> str:
    """'auto' under torchrun with CUDA: this rank's own GPU (local rank modulo the GPUs on the host)."""
    if device != "auto" or dist.world_size == 1:
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    device = f"cuda:{dist.local_rank % torch.cuda.device_count()}"
    torch.cuda.set_device(device)
    return device
