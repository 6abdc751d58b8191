"""What each Triton kernel of the CUDA path costs an SM, found without a GPU.

The engine's own launchers run on CPU tensors of real shapes (the sampler ops at V = 151,936 with
CUDA_CONFIG, bf16 and fp32 logits, B 1 and 64; the decoder's kernels at the Qwen3 0.6B/1.7B/8B layer shapes,
1 and 16 rows, a decode step and a G = 4 round) with Triton in compiled mode; each launch is caught before
it runs (Triton's jit_cache_hook), with the signature, constexprs, alignment specialisation and options a
CUDA launch of the same arguments gets. Each distinct kernel is then compiled for sm_90 (H100/H200) and
Triton's own ptxas is asked for its resource report: registers per thread, bytes spilled to local memory,
shared memory, and how many programs one SM holds at once.

A spill is a register the compiler ran out of: a store and a load through local memory (L1 at best) where a
register access was meant, in every program. A kernel whose registers times threads or whose shared memory
exceeds the SM's cannot launch at all. The interpreter shows neither.

    python bench/kernel_resources.py                 # the table, and JSON (bench/results/kernel_resources.json)
    python bench/kernel_resources.py --only sampler  # one family: sampler or forward
    python bench/kernel_resources.py --quick         # bf16 logits at B = 1 and the 0.6B shapes (the test's)

tests/test_kernel_resources.py runs it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compiled, not interpreted: before anything imports triton
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

CAPABILITY = 90  # H100 / H200
TARGET = GPUTarget("cuda", CAPABILITY, 32)
# An sm_90 SM: its register file (allocated per warp, 256 registers at a time), shared memory per SM and the
# most one block may take, resident warps and blocks.
SM_REGISTERS, REGISTER_GRANULE = 65536, 256
SM_SHARED, BLOCK_SHARED = 228 * 1024, 227 * 1024
SM_WARPS, SM_BLOCKS = 64, 32
VOCAB = 151_936  # Qwen3's logit rows
TOKENS = 151_669  # its tokenizer's ids: the token space of a Qwen3 pair, the engine's masks (padded, tokens.py)
# (name, hidden, intermediate, heads, kv heads, head_dim) of the pairs the device check builds.
QWEN3 = (("0.6B", 1024, 3072, 16, 8, 128), ("1.7B", 2048, 6144, 16, 8, 128), ("8B", 4096, 12288, 32, 8, 128))


@dataclass
class Launch:
    """One compiled form of a kernel as a CUDA launch would get it: Triton's signature (types, with
    "constexpr" for constants), its constexprs and attributes (alignment) by argument path, its options."""
    kernel: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int
    fp_fusion: bool
    use: str

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def key(self):
        return (self.name, json.dumps({str(k): repr(v) for k, v in self.constexprs.items()}, sort_keys=True),
                json.dumps(self.signature, sort_keys=True), repr(sorted(self.attrs.items())), self.num_warps,
                self.num_stages, self.fp_fusion)


class _FakeDriver:
    """Enough of Triton's active driver for a launch to reach its compile step without a GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET


class Recorder:
    """Catch every Triton launch inside ``with recorder.catching(use):`` (nothing runs); one Launch per
    distinct compiled form."""

    def __init__(self):
        self.launches: list[Launch] = []
        self._seen = set()
        self._use = ""

    def _hook(self, *, fn, compile, **_):
        options = compile
        launch = Launch(fn.jit_function, dict(compile["signature"]), dict(compile["constants"]),
                        dict(compile["configs"][0]), options["num_warps"], options["num_stages"],
                        options["enable_fp_fusion"], self._use)
        # The interpreter's workaround (bf16 dots upcast on CPU tensors) is never set on CUDA.
        for path, value in list(launch.constexprs.items()):
            if _arg_name(launch.kernel, path) == "DOT_IN_FP32":
                launch.constexprs[path] = False
        if launch.key() not in self._seen:
            self._seen.add(launch.key())
            self.launches.append(launch)
        return True  # handled: Triton neither compiles nor launches

    @contextlib.contextmanager
    def catching(self, use: str):
        from triton.runtime import driver

        self._use = use
        previous, previous_driver = triton.knobs.runtime.jit_cache_hook, driver._active
        driver.set_active(_FakeDriver())
        triton.knobs.runtime.jit_cache_hook = self._hook
        try:
            yield
        finally:
            triton.knobs.runtime.jit_cache_hook = previous
            driver._active = previous_driver  # (None without a GPU: reset_active would look for one)


def _arg_name(kernel, path) -> str:
    return kernel.arg_names[path[0]]


def record_sampler(recorder: Recorder, dtypes=(torch.bfloat16, torch.float32), batches=(1, 64), pdl: bool = False):
    """rsd_sample, sample_tokens and rsd_verify as rsd_engine/sampling/triton*.py launch them on CUDA, with the
    masks the engine passes for a Qwen3 pair (TokenSpace.sampler_masks: a mask's length is specialised); pdl: as
    launched with RSD_PDL=on."""
    if pdl:
        _force_pdl()
    from bench_rsd_step import make_step
    from bench_rsd_verify import make_round

    from rsd_engine.tokens import TokenSpace

    from rsd_engine.sampling import triton as triton_backend
    from rsd_engine.sampling.triton_verify import rsd_verify_triton, sample_tokens_triton

    original = triton_backend._launch_config
    triton_backend._launch_config = lambda device: triton_backend.CUDA_CONFIG  # CPU tensors, CUDA's launch shape
    import rsd_engine.sampling.triton_verify as verify_backend
    verify_backend._launch_config = triton_backend._launch_config
    space = torch.arange(TOKENS) < TOKENS
    masks = TokenSpace(TOKENS, space, space.clone()).sampler_masks(VOCAB)
    try:
        for dtype in dtypes:
            for B in batches:  # 1: many programs per row and side; 64: one
                step = (*make_step(B, VOCAB, "cpu", dtype=dtype)[:4], *masks)
                with recorder.catching(f"rsd_sample B={B}"):
                    triton_backend.rsd_sample_triton(*step)
                _, logits, uniforms, params, mask, _ = step
                with recorder.catching(f"sample_tokens B={B}"):
                    sample_tokens_triton(logits, uniforms[:, 0].contiguous(), params.student_temperature,
                                         params.student_top_k, params.student_top_p, mask)
            with recorder.catching("rsd_verify G=4 B=1"):
                rsd_verify_triton(*make_round(1, 4, VOCAB, "cpu", dtype)[:6], *masks)
    finally:
        triton_backend._launch_config = verify_backend._launch_config = original


def _force_pdl():
    """CPU tensors here: every launch as an sm_90 card gets it with RSD_PDL=on (kernels/pdl.py)."""
    from rsd_engine.sampling import triton as triton_backend

    triton_backend.uses_pdl = lambda device: True


def record_forward(recorder: Recorder, shapes=QWEN3, pdl: bool = False):
    """The decoder's kernels (rsd_engine/models/triton_ops.py) at Qwen3 layer shapes, bf16; the uniforms.
    pdl: as launched with RSD_PDL=on on an sm_90 card (kernels/pdl.py)."""
    from rsd_engine.models import triton_ops as ops
    from rsd_engine.randomness import NUM_DRAWS, uniforms_triton

    if pdl:
        _force_pdl()

    bf16 = dict(dtype=torch.bfloat16)
    slots_kv, length = 4, 4096  # the Engine's default max_seq_len
    for name, hidden, inter, heads, kv_heads, dim in shapes:
        q_size = (heads + 2 * kv_heads) * dim
        norm, q_norm = torch.ones(hidden, **bf16), torch.ones(dim, **bf16)
        qkv_w, o_w = torch.empty(q_size, hidden, **bf16), torch.empty(hidden, heads * dim, **bf16)
        gate_up_w, down_w = torch.empty(2 * inter, hidden, **bf16), torch.empty(hidden, inter, **bf16)
        cos = sin = torch.ones(length + 1, dim // 2)
        k_cache, v_cache = (torch.zeros(slots_kv, length + 1, kv_heads, dim, **bf16) for _ in range(2))
        for B, T in ((1, 1), (16, 1), (1, 5)):  # decode steps at batch 1 and 16; a G = 4 round at batch 1
            M = B * T
            hidden_rows = torch.zeros(M, hidden, **bf16)
            positions = torch.arange(T).repeat(B, 1) + 8
            slots = torch.arange(B) % slots_kv
            with recorder.catching(f"{name}, {B} row(s) x {T} token(s)"):
                ops.add_rms_norm(hidden_rows, hidden_rows, norm, 1e-6)
                qkv = ops.skinny_linear(hidden_rows, qkv_w, norm_weight=norm, eps=1e-6)
                q = ops.qk_norm_rope_store(torch.zeros(M, q_size, **bf16), positions.reshape(-1), slots, cos, sin,
                                           q_norm, q_norm, k_cache, v_cache, num_heads=heads,
                                           num_kv_heads=kv_heads, head_dim=dim, tokens_per_row=T, eps=1e-6)
                q = q.view(B, T, heads, dim)
                for splits in (1, 8):  # the CUDA launcher picks up to 32 splits by the SM count
                    ops.decode_attention(q, k_cache, v_cache, slots, positions, splits=splits)
                ops.skinny_linear(torch.zeros(M, heads * dim, **bf16), o_w, residual=hidden_rows)
                gate_up = ops.skinny_linear(hidden_rows, gate_up_w, norm_weight=norm, eps=1e-6)
                ops.silu_mul(torch.zeros(M, 2 * inter, **bf16))
                ops.skinny_linear(torch.zeros(M, 2 * inter, **bf16), down_w, silu_mul=True, residual=hidden_rows)
            del qkv, gate_up
    with recorder.catching("the step's uniforms"):
        uniforms_triton(torch.arange(16), torch.zeros(16, dtype=torch.int64), 1, NUM_DRAWS)


def resources(launch: Launch) -> dict:
    """Compile one launch for sm_90 and read ptxas's report on its PTX (Triton's ptxas, Triton's flags)."""
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    source = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    compiled = triton.compile(source, target=TARGET, options={"num_warps": launch.num_warps,
                                                              "num_stages": launch.num_stages,
                                                              "enable_fp_fusion": launch.fp_fusion})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        fmad = [] if launch.fp_fusion else ["--fmad=false"]
        done = subprocess.run([get_ptxas(CAPABILITY).path, "-v", *fmad, "--regAllocOptLevel=2",
                               f"--gpu-name=sm_{CAPABILITY}a", str(ptx), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed on {launch.name}: {done.stderr[-2000:]}")
    registers = int(re.search(r"Used (\d+) registers", done.stderr).group(1))
    pdl = any(_arg_name(launch.kernel, path) == "PDL" and value is True for path, value in launch.constexprs.items())
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    shared = compiled.metadata.shared
    threads = 32 * launch.num_warps
    per_warp = -(-registers * 32 // REGISTER_GRANULE) * REGISTER_GRANULE
    resident = min(SM_REGISTERS // (per_warp * launch.num_warps), SM_SHARED // shared if shared else SM_BLOCKS,
                   SM_WARPS // launch.num_warps, SM_BLOCKS)
    constexprs = {_arg_name(launch.kernel, path): value for path, value in launch.constexprs.items()
                  if launch.signature.get(_arg_name(launch.kernel, path)) == "constexpr"}
    return dict(kernel=launch.name, use=launch.use, num_warps=launch.num_warps, num_stages=launch.num_stages,
                constexprs={k: v if isinstance(v, (int, float, str, bool)) or v is None else repr(v)
                            for k, v in constexprs.items()},
                registers=registers, threads=threads, spill_stores=int(spill.group(1)) if spill else 0,
                spill_loads=int(spill.group(2)) if spill else 0, shared=shared,
                launchable=registers * threads <= SM_REGISTERS and shared <= BLOCK_SHARED,
                programs_per_sm=resident, warps_per_sm=resident * launch.num_warps,
                **(dict(pdl_wait_first=wait_comes_first(compiled.asm["ptx"])) if pdl else {}))


# Instructions of a PTX listing that touch global memory: loads, stores, atomics and reductions, async copies.
GLOBAL_ACCESS = re.compile(r"\b(?:ld|st|atom|red|ldu)\.global\b|\bcp\.async\b|\bcp\.reduce\.async\b")


def wait_comes_first(ptx: str) -> bool:
    """Whether a kernel launched with PDL waits for the kernel before it (griddepcontrol.wait) before its first
    access to global memory, as kernels/pdl.py requires: a load above the wait could read what the previous
    kernel has not written yet, a store above it could overwrite what that kernel still reads."""
    wait = ptx.find("griddepcontrol.wait")
    first = GLOBAL_ACCESS.search(ptx)
    return wait >= 0 and (first is None or wait < first.start())


def record(only: str | None = None, quick: bool = False, pdl: bool = False) -> list[Launch]:
    """Every distinct compiled form the launchers produce; quick: bf16 logits at B = 1 and the 0.6B shapes;
    pdl: as launched with RSD_PDL=on."""
    recorder = Recorder()
    if only in (None, "sampler"):
        record_sampler(recorder, *(((torch.bfloat16,), (1,)) if quick else ((torch.bfloat16, torch.float32), (1, 64))),
                       pdl=pdl)
    if only in (None, "forward"):
        record_forward(recorder, QWEN3[:1] if quick else QWEN3, pdl=pdl)
    return recorder.launches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "kernel_resources.json")
    parser.add_argument("--only", choices=("sampler", "forward"), help="one family of kernels")
    parser.add_argument("--quick", action="store_true", help="bf16 logits at B = 1 and the 0.6B shapes only")
    parser.add_argument("--pdl", action="store_true", help="every kernel as launched with RSD_PDL=on (programmatic "
                        "dependent launch): each must wait before its first global access")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'kernel':26} {'warps':>5} {'stages':>6} {'regs':>5} {'spill st/ld (B)':>15} {'shared':>7} "
          f"{'progs/SM':>8}  first launched by")
    for launch in record(args.only, args.quick, args.pdl):
        row = resources(launch)
        rows.append(row)
        print(f"{row['kernel']:26} {row['num_warps']:5d} {row['num_stages']:6d} {row['registers']:5d} "
              f"{row['spill_stores']:>7d}/{row['spill_loads']:<7d} {row['shared']:7d} {row['programs_per_sm']:8d}  "
              f"{row['use']}", flush=True)
    spilling = sum(bool(r["spill_stores"] or r["spill_loads"]) for r in rows)
    print(f"{len(rows)} compiled forms for sm_{CAPABILITY}: {spilling} spill registers, "
          f"{sum(not r['launchable'] for r in rows)} cannot launch"
          + (f", {sum(not r['pdl_wait_first'] for r in rows if 'pdl_wait_first' in r)} of "
             f"{sum('pdl_wait_first' in r for r in rows)} PDL launches touch memory before their wait" if args.pdl
             else ""))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(capability=CAPABILITY, triton=triton.__version__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
