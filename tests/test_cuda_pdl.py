"""On a card of compute capability 9.0 or later (Hopper): RSD_PDL=on gives the traces of plain launches, bit for
bit. Its own file, in bench/device_check.sh's list before the sampler's sweeps of cases (it compiles every kernel
again, with PDL). Skipped without such a card."""
import pytest
import torch

from rsd_engine import Engine, SamplingParams
from rsd_engine.sampling.triton import uses_pdl

from test_cuda import PROMPTS


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs compute capability 9.0 (Hopper) or later")
def test_pdl_launches_give_the_same_traces(tiny_pair, monkeypatch):
    """RSD_PDL=on (kernels/pdl.py): the decoder's kernels launched with programmatic dependent launch, eagerly
    (prefill) and in the captured decode graphs, give the traces of plain launches bit for bit, sampled rows and
    draft rounds alike (the skinny GEMMs forced on, so every kernel of the forward takes it)."""
    monkeypatch.setenv("RSD_SKINNY_GEMM", "on")
    params = [SamplingParams(max_new_tokens=24, seed=i, threshold=0.01, ignore_eos=True) for i in range(3)]
    runs = {}
    for pdl in ("off", "on"):
        monkeypatch.setenv("RSD_PDL", pdl)
        assert uses_pdl(torch.device("cuda")) is (pdl == "on")  # the comparison is of two different launches
        for draft in (0, 2):
            engine = Engine(*tiny_pair, device="cuda", dtype="bfloat16", max_batch_size=4, max_seq_len=128,
                            draft_tokens=draft)
            runs[pdl, draft] = [(r.token_ids, r.accepted, [x.hex() for x in r.teacher_logprobs],  # NaN == NaN
                                 [x.hex() for x in r.student_logprobs])
                                for r in engine.generate_batch(PROMPTS, params)]
    assert runs["on", 0] == runs["off", 0]
    assert runs["on", 2] == runs["off", 2]
