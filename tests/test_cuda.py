"""What only a CUDA machine can check (bench/device_check.sh runs these first): the Triton kernel compiled
for the card against the reference, a CUDA-graph replay of the decode step against the same step run
eagerly, and the engine's greedy output on CUDA against the CPU engine's. Skipped without CUDA."""
import pytest
import torch

from rsd_engine import Engine, SamplingParams
from rsd_engine.results import GenerationResult
from rsd_engine.sampling import rsd_sample, rsd_sample_reference
from rsd_engine.scheduler import Request

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["The answer is", "Let x be a number such that 2x + 3 = 11. Then", "1 + 1 ="]
GREEDY = dict(temperature=0.0, student_temperature=0.0)


@pytest.mark.parametrize("family", ["default", "greedy", "top_k_top_p", "trials", "mixed"])
@pytest.mark.parametrize("B,V", [(1, 32_000), (16, 151_936), (32, 49_152)])
def test_triton_on_cuda_matches_the_reference(B, V, family):
    """The compiled kernel on the card, token for token against the reference on CPU (same uniforms), up to
    rows whose decisions a float64 replay shows to be within rounding (test_rsd_sample's rule)."""
    from test_rsd_sample import assert_matches_reference, random_rows, row_params, uniforms_for

    teacher, student, proposal_mask, fallback_mask = random_rows(B, V, seed=B + V)
    uniforms, params = uniforms_for(B, seed=B), row_params(B, family, seed=B)
    cuda = [t.cuda() for t in (teacher, student, uniforms, proposal_mask, fallback_mask)]
    out = rsd_sample(cuda[0], cuda[1], cuda[2], type(params)(*(p.cuda() for p in params)), cuda[3], cuda[4],
                     backend="triton")
    out = type(out)(*(t.cpu() for t in out))
    ref = rsd_sample_reference(teacher, student, uniforms, params, proposal_mask, fallback_mask)
    same = assert_matches_reference(out, ref, teacher, student, uniforms, params, proposal_mask, fallback_mask)
    assert same.float().mean() >= 0.9


def decode_batch(engine):
    """Requests at their first decode step, their prompts already in the caches."""
    params = SamplingParams(threshold=0.003, seed=0)
    batch = []
    for slot, prompt in enumerate(PROMPTS):
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        r = Request(slot, ids, ids, params, seed=slot, result=GenerationResult(ids))
        r.slot, r.student_len, r.teacher_len = slot, len(ids) - 1, len(ids) - 1
        r.next_student_token = r.next_teacher_token = ids[-1]
        batch.append(r)
    engine._prefill(batch)
    return batch


def test_cuda_graph_replay_equals_eager(tiny_pair):
    """Three rows of the step state replayed in the captured graph of bucket 4 (one padding row into the
    scratch slot) give what the same step gives run eagerly, and move the rows on by themselves; the
    writes are the same K/V, so the order does not matter."""
    engine = Engine(*tiny_pair, device="cuda", dtype="float32", max_batch_size=4, max_seq_len=128)
    with torch.inference_mode():
        batch = decode_batch(engine)
        inputs = engine._step_inputs(batch, with_slots=True)
        eager = [t.clone() for t in engine.decode_step(inputs, teacher_kv=128, student_kv=128)]
        state = engine._state
        state.sync(batch)
        runner = engine._capture(128)
        assert runner.enabled and 4 in runner.buckets
        assert runner(3) == 4
        replayed = state.out[:3].cpu()
        after = {name: t.cpu() for name, t in state.inputs(4).items()}
    eager = [t.cpu() for t in eager]
    assert torch.equal(replayed[:, 0].long(), eager[0]) and torch.equal(replayed[:, 1].bool(), eager[1])
    torch.testing.assert_close(replayed[:, 2].float(), eager[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(replayed[:, 3].float(), eager[3], atol=1e-4, rtol=1e-4)
    assert torch.equal(after["student_tokens"][:3], eager[0])
    assert torch.equal(after["student_pos"][:3], inputs["student_pos"].cpu() + 1)
    assert after["slots"][3] == 4 and after["student_pos"][3] == 0  # the padding row stays in the scratch slot


@pytest.mark.parametrize("threshold", [0.0, 1.0], ids=["teacher", "student"])
def test_engine_greedy_on_cuda_equals_cpu(tiny_pair, threshold):
    """float32 on both: greedy decoding of either model (threshold 0 keeps every proposal, 1 none)."""
    params = SamplingParams(max_new_tokens=16, threshold=threshold, **GREEDY)
    cpu = Engine(*tiny_pair, device="cpu", dtype="float32", max_batch_size=2, max_seq_len=128)
    gpu = Engine(*tiny_pair, device="cuda", dtype="float32", max_batch_size=2, max_seq_len=128)
    assert gpu.sampler == "triton"
    for want, got in zip(cpu.generate_batch(PROMPTS, params), gpu.generate_batch(PROMPTS, params)):
        assert got.token_ids == want.token_ids and got.accepted == want.accepted
        assert got.teacher_logprobs == pytest.approx(want.teacher_logprobs, abs=1e-3)


def test_decode_loop_host_traffic_on_cuda(tiny_pair, monkeypatch):
    """The loop as it runs on the card (pipelined: step n committed while step n+1 runs): per decode step at
    most one device-to-host copy and one upload, none where the batch did not change (test_host_syncs
    counts the same on CPU); the tokens are those of the step-by-step loop."""
    from test_host_syncs import PROMPTS as prompts, assert_budget, per_step_traffic

    params = [SamplingParams(max_new_tokens=4 + 3 * i, seed=i, threshold=0.01, ignore_eos=True) for i in range(4)]
    step_by_step = Engine(*tiny_pair, device="cuda", dtype="float32", max_batch_size=3, max_seq_len=128)
    step_by_step.pipelined = False
    want = step_by_step.generate_batch(prompts, params)
    engine = Engine(*tiny_pair, device="cuda", dtype="float32", max_batch_size=3, max_seq_len=128)
    assert engine.pipelined
    steps = per_step_traffic(engine, monkeypatch)
    got = engine.generate_batch(prompts, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.accepted for g in got] == [w.accepted for w in want]
    assert_budget(steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_attention_in_a_graph_on_cuda(dtype):
    """Attention with each row's keys split over 8 programs, the last to arrive merging them (no second
    launch): against SDPA, captured in a CUDA graph and replayed with new queries (the arrival counters must
    be back at zero after every launch), and bit for bit the same on a second replay of the same queries."""
    from test_decode_attention import sdpa_reference

    from rsd_engine.models import triton_ops as ops

    B, T, Hkv, G, D, L = 6, 3, 4, 4, 128, 2048
    g = torch.Generator().manual_seed(15)
    k_cache, v_cache = (torch.randn(B + 1, L + 1, Hkv, D, generator=g).to(dtype).cuda() for _ in "kv")
    slots = torch.randperm(B + 1, generator=g)[:B].cuda()
    positions = (torch.tensor([5, 700, 1500, 2040, 64, 1023])[:, None] + torch.arange(T)).cuda()
    queries = [torch.randn(B, T, Hkv * G, D, generator=g).to(dtype).cuda() for _ in range(3)]
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)

    def expected(q):
        return sdpa_reference(q.float().cpu(), k_cache.float().cpu(), v_cache.float().cpu(), slots.cpu(),
                              positions.cpu())

    static_q = queries[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, and zeroes the counters outside the capture
        ops.decode_attention(static_q, k_cache, v_cache, slots, positions, splits=8)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.decode_attention(static_q, k_cache, v_cache, slots, positions, splits=8)
    for q in queries:
        static_q.copy_(q)
        graph.replay()
        first = out.clone()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)
        torch.testing.assert_close(first.float().cpu(), expected(q), **tol)
        assert all(not c.any() for c in ops._counters.values()), "an arrival counter was left non-zero"


def test_uniforms_kernel_on_cuda_equals_torch():
    """kernels/uniforms.py compiled for the card, bit for bit the torch ops on CPU (test_uniforms.py's grid)."""
    from test_uniforms import grid

    from rsd_engine.randomness import NUM_DRAWS, round_uniforms, step_uniforms, step_uniforms_torch

    seeds, steps = grid()
    got = step_uniforms(seeds.cuda(), steps.cuda()).cpu()
    assert torch.equal(got.view(torch.int32), step_uniforms_torch(seeds, steps).view(torch.int32))
    rounds = round_uniforms(seeds.cuda(), steps.cuda(), 5).cpu()
    for i in range(5):
        assert torch.equal(rounds[:, i, :NUM_DRAWS], step_uniforms_torch(seeds, steps + i))


@pytest.mark.parametrize("M", [1, 5, 16])
def test_skinny_linear_on_cuda_matches_cublas(M):
    """kernels/skinny_linear.py compiled for the card, every fused variant at Qwen3-0.6B shapes in bf16, against
    the kernels it replaces (add_rms_norm / silu_mul + cuBLAS + the residual add)."""
    import torch.nn.functional as F

    from rsd_engine.models import triton_ops as ops

    g = torch.Generator(device="cuda").manual_seed(M)
    rand = lambda *shape: torch.randn(*shape, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
    hidden, attn, gate_up = rand(M, 1024), rand(M, 2048), rand(M, 6144)
    qkv_w, o_w, down_w = rand(4096, 1024) * 0.03, rand(1024, 2048) * 0.03, rand(1024, 3072) * 0.03
    bias, norm_w = rand(4096), rand(1024)
    close = dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(ops.skinny_linear(hidden, qkv_w, bias, norm_weight=norm_w, eps=1e-6),
                               F.linear(ops.add_rms_norm(hidden.clone(), None, norm_w, 1e-6), qkv_w, bias), **close)
    torch.testing.assert_close(ops.skinny_linear(attn, o_w, residual=hidden.clone()), hidden + F.linear(attn, o_w),
                               **close)
    torch.testing.assert_close(ops.skinny_linear(gate_up, down_w, silu_mul=True, residual=hidden.clone()),
                               hidden + F.linear(ops.silu_mul(gate_up), down_w), **close)


def test_skinny_probe_on_cuda(tiny_pair, monkeypatch):
    """The probe runs on the card (compiles, captures, times both paths) and picks a probed row count; the
    fused path's forward then matches cuBLAS's."""
    from rsd_engine.models import load_model, skinny

    monkeypatch.setenv("RSD_SKINNY_GEMM", "auto")
    monkeypatch.setattr(skinny, "_probed", {})
    model = load_model(tiny_pair[1], dtype=torch.bfloat16, device="cuda")
    cache = model.new_cache(4, 64)
    assert model.skinny_rows in (0, *skinny.PROBE_ROWS) and 1 in model.skinny_probe
    ids, positions = torch.tensor([[5, 6, 7]] * 4, device="cuda"), torch.arange(3, device="cuda").repeat(4, 1)
    outs = []
    for rows in (16, 0):
        model.skinny_rows = rows
        with torch.no_grad():
            outs.append(model(ids, positions, cache, None, 64).float())
    torch.testing.assert_close(outs[0], outs[1], atol=0.3, rtol=0.05)  # bf16 hidden up to ~12 (final norm x4)
