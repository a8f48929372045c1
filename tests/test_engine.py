"""Engine: batched == single-request greedy, prefix hit == miss (memory and disk), speculative == plain,
batch invariance, sampling options, streaming, cancellation, memory budget, the paged pool (slot reuse,
admission, export / load). Tiny random model, token ids.

The engine's default KV cache is the paged FP8 pool, whose model equals the reference model seeing KV
through the same formats (`kernels.simulate_fp8_kv`); so paged outputs are compared with `generate` under
that switch (`fp8_generate`), reference-mode outputs with plain `generate`."""

import random
import threading
import time

import pytest
import torch

from dsv4 import kernels
from dsv4.config import preset
from dsv4.engine import Engine, EngineConfig, RequestRejected, SamplingParams
from dsv4.engine import cache_ops
from dsv4.engine.text import TextStream
from dsv4.generate import generate
from dsv4.kernels.paged_cache import PagedKVCache
from dsv4.paged import PagedBatch

from conftest import random_model

LENGTHS = (3, 127, 128, 129, 261)  # around the 128-token prefix block (and the CSA / HCA block ends)


@pytest.fixture(scope="module")
def model():
    return random_model(preset("tiny"))


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(2, 512, (n,), generator=gen).tolist() for n in LENGTHS]


def fp8_generate(model, prompt, params):
    """What one request gives on the paged pool: `generate` with KV rounded through the pool's formats."""
    with kernels.simulate_fp8_kv():
        return generate(model, prompt, params)


@pytest.fixture(scope="module")
def reference(model, prompts):
    """One-request greedy decoding as on the paged pool, 24 tokens each: crosses compressor blocks."""
    return [fp8_generate(model, p, SamplingParams(max_new_tokens=24)) for p in prompts]


@pytest.fixture(scope="module")
def plain_reference(model, prompts):
    """The same with the model-dtype cache (kv_cache="reference", speculative decoding)."""
    return [generate(model, p, SamplingParams(max_new_tokens=24)) for p in prompts]


def run_all(engine, prompts, params, stagger=0.0):
    handles = []
    for p in prompts:
        handles.append(engine.submit(p, params))
        time.sleep(stagger)  # later requests join a batch that is already decoding
    return [h.result(timeout=120) for h in handles]


def toy_decode(ids):
    return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.mark.parametrize("kv", ["paged", "reference"])
def test_batched_equals_single_request(model, prompts, reference, plain_reference, kv):
    with Engine(model, EngineConfig(prefill_chunk=128, prefix_cache_bytes=0, kv_cache=kv)) as engine:
        outs = run_all(engine, prompts, SamplingParams(max_new_tokens=24), stagger=0.01)
        stats = engine.stats()
    assert stats["kv_cache"] == kv
    assert [o.token_ids for o in outs] == (reference if kv == "paged" else plain_reference)
    assert all(o.finish_reason == "length" and o.usage.completion_tokens == 24 for o in outs)
    assert stats["running"] == 0 and stats["kv_reserved_bytes"] == 0
    # Fewer forwards than one per token per request: rows really shared forwards.
    assert stats["forward_passes"] < sum(24 + (n + 127) // 128 for n in LENGTHS)


def test_prefix_hit_equals_miss_and_survives_restart(model, prompts, reference, plain_reference, tmp_path):
    cfg = EngineConfig(prefill_chunk=128, prefix_dir=str(tmp_path))
    params = SamplingParams(max_new_tokens=24)
    with Engine(model, cfg) as engine:
        first = run_all(engine, prompts, params)
        again = run_all(engine, prompts, params)
        stats = engine.stats()
    assert [o.token_ids for o in first] == [o.token_ids for o in again] == reference
    assert [o.usage.cached_tokens for o in first] == [0] * len(LENGTHS)
    # The longest block-aligned prefix that leaves >= 1 token to feed: 0, 0, 0 (127 of 128), 128, 256.
    assert [o.usage.cached_tokens for o in again] == [0, 0, 0, 128, 256]
    assert stats["prefix_hits"] == 2 and stats["prefix_disk_writes"] >= 2
    # A fresh engine (empty memory) finds the snapshots on disk; a shared prefix with a new tail hits too.
    with Engine(model, cfg) as engine:
        restarted = run_all(engine, prompts[3:], params)
        tail = prompts[4][:200] + [5, 6, 7]
        extended = engine.generate(tail, params)
        assert engine.stats()["prefix_disk_loads"] >= 2
    assert [o.token_ids for o in restarted] == reference[3:]
    assert [o.usage.cached_tokens for o in restarted] == [128, 256] and extended.usage.cached_tokens == 128
    assert extended.token_ids == fp8_generate(model, tail, params)
    # The other layout never reads these snapshots (its fingerprint differs): a miss, the right tokens.
    with Engine(model, EngineConfig(prefill_chunk=128, prefix_dir=str(tmp_path), kv_cache="reference")) as engine:
        other = engine.generate(prompts[3], params)
    assert other.usage.cached_tokens == 0 and other.token_ids == plain_reference[3]


def test_corrupt_prefix_file_is_a_miss(model, prompts, reference, tmp_path):
    cfg = EngineConfig(prefill_chunk=128, prefix_dir=str(tmp_path))
    with Engine(model, cfg) as engine:
        engine.generate(prompts[3], SamplingParams(max_new_tokens=24))
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1
    files[0].write_bytes(b"not a safetensors file")
    with Engine(model, cfg) as engine:
        out = engine.generate(prompts[3], SamplingParams(max_new_tokens=24))
        assert engine.stats()["prefix_disk_errors"] == 1
    assert out.token_ids == reference[3] and out.usage.cached_tokens == 0


def test_cache_tensors_round_trip(model, prompts):
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.tensor([prompts[4]]), cache)
        _, h = model(torch.tensor([prompts[4][:2]]), cache, return_hidden=True)
        model.mtp_logits(h, torch.tensor([[1, 2]]), cache)
    back = cache_ops.from_tensors(model.config, cache_ops.to_tensors(cache))
    assert back.length == cache.length and back.mtp_length == cache.mtp_length
    assert back.nbytes() == cache.nbytes()
    for a, b in zip(cache_ops.to_tensors(cache).values(), cache_ops.to_tensors(back).values()):
        assert torch.equal(a, b)
    assert cache.nbytes() <= cache_ops.estimate_bytes(model.config, cache.length, 4)
    with pytest.raises(ValueError, match="no layer"):
        cache_ops.from_tensors(model.config, {**cache_ops.to_tensors(cache), "layers.9.window": torch.zeros(1)})


def oracle_drafter(prompts, reference, rate, seed=0):
    """Drafts the true greedy token with probability `rate`, else a wrong one: both paths, every position."""
    truth = {tuple(p): r for p, r in zip(prompts, reference)}
    rng = random.Random(seed)

    def draft(mtp_logits, contexts):
        out = []
        for ctx in contexts:
            for p, ref in truth.items():
                if tuple(ctx[:len(p)]) == p and len(ctx) - len(p) < len(ref):
                    right = ref[len(ctx) - len(p)]
                    out.append(right if rng.random() < rate else (right + 1) % 512)
                    break
            else:
                out.append(0)
        return out
    return draft


@pytest.mark.parametrize("rate", [0.0, 0.6, 1.0])
def test_speculative_equals_plain_greedy(model, prompts, plain_reference, rate):
    """Speculation needs rollback, so it runs on the reference cache (switched to automatically)."""
    reference = plain_reference
    drafter = oracle_drafter(prompts, reference, rate)
    with Engine(model, EngineConfig(prefill_chunk=128, speculative=True), drafter=drafter) as engine:
        outs = run_all(engine, prompts, SamplingParams(max_new_tokens=24), stagger=0.01)
        again = run_all(engine, prompts[3:], SamplingParams(max_new_tokens=24))  # from prefix snapshots
        stats = engine.stats()
    assert stats["kv_cache"] == "reference"
    assert [o.token_ids for o in outs] == reference
    assert [o.token_ids for o in again] == reference[3:]
    assert stats["spec_drafted"] > 0
    if rate == 1.0:
        assert stats["spec_accept_rate"] == 1.0
    elif rate == 0.0:
        assert stats["spec_accepted"] == 0
    else:
        assert 0.2 < stats["spec_accept_rate"] < 0.95


def test_speculative_with_the_real_mtp_block(model, prompts, plain_reference):
    with Engine(model, EngineConfig(prefill_chunk=128, speculative=True)) as engine:
        outs = run_all(engine, prompts, SamplingParams(max_new_tokens=24))
        assert engine.stats()["spec_drafted"] > 0
    assert [o.token_ids for o in outs] == plain_reference


def test_batch_invariant_mode(model, prompts):
    """Sampled tokens and their log-probabilities are bitwise the same alone and in a crowd."""
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_new_tokens=12, logprobs=2)
    cfg = EngineConfig(prefill_chunk=128, batch_invariant=True)
    with Engine(model, cfg) as engine:
        alone = engine.generate(prompts[4], params)
    with Engine(model, cfg) as engine:
        others = [engine.submit(p, SamplingParams(temperature=1.0, seed=i, max_new_tokens=20))
                  for i, p in enumerate(prompts[:4])]
        crowded = engine.submit(prompts[4], params).result(120)
        [o.result(120) for o in others]
    assert crowded.token_ids == alone.token_ids
    assert [lp.logprob for lp in crowded.logprobs] == [lp.logprob for lp in alone.logprobs]


def test_sampling_options(model, prompts, reference):
    with Engine(model, EngineConfig(prefill_chunk=128), decode=toy_decode) as engine:
        a = engine.generate(prompts[1], SamplingParams(temperature=1.0, seed=5, max_new_tokens=16))
        b = engine.generate(prompts[1], SamplingParams(temperature=1.0, seed=5, max_new_tokens=16))
        c = engine.generate(prompts[1], SamplingParams(temperature=1.0, seed=6, max_new_tokens=16))
        top1 = engine.generate(prompts[1], SamplingParams(temperature=1.0, top_k=1, seed=1, max_new_tokens=24))
        ref = reference[1]
        stop_tok = engine.generate(prompts[1], SamplingParams(max_new_tokens=24, stop_token_ids=(ref[5],)))
        stop_str = toy_decode(ref[6:8])
        stopped = engine.generate(prompts[1], SamplingParams(max_new_tokens=24, stop=(stop_str,)))
        lp = engine.generate(prompts[1], SamplingParams(max_new_tokens=3, logprobs=3))
    assert a.token_ids == b.token_ids != c.token_ids
    assert top1.token_ids == ref
    first = ref.index(ref[5])
    assert stop_tok.token_ids == ref[:first + 1] and stop_tok.finish_reason == "stop"
    assert stop_tok.stop_reason == ref[5] and stop_tok.text == toy_decode(ref[:first])
    cut = toy_decode(ref).find(stop_str)
    assert stopped.text == toy_decode(ref)[:cut] and stopped.finish_reason == "stop"
    assert stopped.stop_reason == stop_str
    with torch.no_grad(), kernels.simulate_fp8_kv():
        full = model(torch.tensor([prompts[1] + ref[:2]]))[0, -3:].log_softmax(-1)
    for i, item in enumerate(lp.logprobs):
        assert item.token == ref[i]
        assert item.logprob == pytest.approx(full[i, ref[i]].item(), abs=1e-4)
        assert [t for t, _ in item.top] == full[i].topk(3).indices.tolist()


def test_streaming_events_and_callback(model, prompts):
    seen = []
    with Engine(model, EngineConfig(prefill_chunk=128), decode=toy_decode) as engine:
        handle = engine.submit(prompts[2], SamplingParams(max_new_tokens=10), on_event=seen.append)
        events = list(handle.events(timeout=60))
        result = handle.result()
    assert [e.token_ids for e in events[:-1]] == [[t] for t in result.token_ids]
    assert events[-1].finished and events[-1].usage.completion_tokens == 10
    assert "".join(e.text for e in events) == result.text == toy_decode(result.token_ids)
    assert seen == events


def test_cancellation_frees_the_slot(model, prompts):
    with Engine(model, EngineConfig(prefill_chunk=128, max_batch=1)) as engine:
        started = threading.Event()
        long = engine.submit(prompts[0], SamplingParams(max_new_tokens=3000),
                             on_event=lambda e: started.set())
        queued = engine.submit(prompts[1], SamplingParams(max_new_tokens=4))
        assert started.wait(60)
        time.sleep(0.05)
        assert not queued.done  # max_batch=1: waits for the slot
        long.cancel()
        assert long.result(60).finish_reason == "cancelled"
        assert queued.result(60).finish_reason == "length"
        stats = engine.stats()
    assert 0 < long.result().usage.completion_tokens < 3000
    assert stats["running"] == 0 and stats["kv_reserved_bytes"] == 0 and stats["finished"]["cancelled"] == 1


@pytest.mark.parametrize("kv", ["paged", "reference"])
def test_memory_budget(model, prompts, kv):
    if kv == "paged":  # a pool of 400 tokens (4 slots, blocks of 4 entries): one 269-token request fits, not two
        budget = PagedKVCache(model.config, 4, 400, 4, device="meta").allocated_bytes()
    else:
        budget = int(cache_ops.estimate_bytes(model.config, 261 + 8, 4) * 1.5)
    cfg = EngineConfig(prefill_chunk=128, kv_budget_bytes=budget, kv_cache=kv, max_batch=4, kv_block_size=4)
    with Engine(model, cfg) as engine:
        with pytest.raises(RequestRejected, match="KV cache") as e:
            engine.submit(prompts[4], SamplingParams(max_new_tokens=3000))
        assert e.value.code == "context_length_exceeded" and "3000" in str(e.value)
        running = []
        handles = [engine.submit(prompts[4], SamplingParams(max_new_tokens=8),
                                 on_event=lambda ev: running.append(engine.stats()["running"])) for _ in range(3)]
        assert all(h.result(60).finish_reason == "length" for h in handles)
        stats = engine.stats()
    assert max(running) == 1  # the budget admits one request at a time; the others waited
    assert stats["requests_rejected"] == 1 and stats["kv_reserved_bytes"] == 0 and stats["finished"] == {"length": 3}
    if kv == "paged":
        assert stats["kv_pool_tokens"] == 400 and stats["kv_pool_bytes"] <= budget
        assert stats["kv_pool_slots_used"] == 0
        with pytest.raises(ValueError, match="max_batch=64"):  # the slots' own state does not fit
            Engine(model, EngineConfig(prefill_chunk=128, kv_budget_bytes=budget))


def test_many_requests_over_few_slots(model):
    """16 concurrent requests through a 3-slot pool: slots and blocks are reused, every output is right."""
    gen = torch.Generator().manual_seed(11)
    ps = [torch.randint(2, 512, (n,), generator=gen).tolist() for n in (5, 30, 61, 90)]
    params = SamplingParams(max_new_tokens=6)
    with Engine(model, EngineConfig(prefill_chunk=128, max_batch=3, kv_block_size=4, prefix_cache_bytes=0)) as engine:
        running = []
        handles = [engine.submit(ps[i % 4], params,
                                 on_event=lambda ev: running.append(engine.stats()["kv_pool_slots_used"]))
                   for i in range(16)]
        outs = [h.result(120) for h in handles]
        stats = engine.stats()
    want = [fp8_generate(model, p, params) for p in ps]
    assert [o.token_ids for o in outs] == [want[i % 4] for i in range(16)]
    assert max(running) == 3 and stats["kv_pool_slots_used"] == 0 and stats["kv_reserved_bytes"] == 0
    assert stats["finished"] == {"length": 16}
    assert stats["forward_passes"] < 16 * 6  # decoding rows shared forwards


def test_paged_export_load_round_trip(model, prompts):
    """A slot exported after 150 tokens and loaded into another pool (other slot, other block size)
    continues exactly as the original; tensors of another layout are refused before anything is written."""
    ids = torch.tensor([prompts[4]])
    a = PagedKVCache(model.config, 2, 512, 4)
    b = PagedKVCache(model.config, 3, 512, 16)
    sa, _, sb = a.allocate(), b.allocate(), b.allocate()
    with torch.no_grad():
        model(ids[:, :150], PagedBatch(a, [sa]))
        state = a.export(sa)
        b.load(sb, state)
        assert b.lengths[sb] == 150 and all(torch.equal(v, state[k]) for k, v in b.export(sb).items())
        for t in range(150, 160):  # each pool decodes the same tokens
            la, lb = (model(ids[:, t:t + 1], PagedBatch(p, [s])) for p, s in ((a, sa), (b, sb)))
            assert torch.equal(la, lb)
    other = PagedKVCache(model.config, 1, 512, 4, index_keys="fp4")
    with pytest.raises(ValueError, match="keys"):
        other.load(other.allocate(), state)
    assert other.lengths[0] == 0
    with pytest.raises(ValueError, match="empty"):
        b.load(sb, state)


def test_bad_requests(model):
    with Engine(model, EngineConfig(prefill_chunk=128)) as engine:
        with pytest.raises(RequestRejected, match="context"):
            engine.submit([1] * 100, SamplingParams(max_new_tokens=model.config.max_position_embeddings))
        with pytest.raises(RequestRejected, match="empty"):
            engine.submit([], SamplingParams())
        with pytest.raises(RequestRejected, match="vocabulary"):
            engine.submit([1, 600], SamplingParams())
        with pytest.raises(RequestRejected, match="tokenizer"):
            engine.submit([1, 2], SamplingParams(stop=("x",)))
    with pytest.raises(ValueError, match="multiple of 128"):
        Engine(model, EngineConfig(prefill_chunk=100))


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    pieces = {1: b"h", 2: b"\xc3", 3: b"\xa9", 4: b"E", 5: b"N", 6: b"D", 7: b"!"}
    decode = lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")  # noqa: E731
    ts = TextStream(decode, stop=("END",))
    assert [ts.add(t) for t in (1, 2, 3, 4, 5)] == ["h", "", "é", "", ""]
    assert ts.add(6) == "" and ts.stopped and ts.matched == "END" and ts.output == "hé"
    ts = TextStream(decode, stop=("END",))
    assert [ts.add(t) for t in (4, 5, 7)] == ["", "", "EN!"] and ts.finish() == ""
