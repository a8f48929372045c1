"""Training: schedules, phases, recipe pieces, resume, the CLI, data-parallel equality, and a loss that falls."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4.config import ConfigError, preset
from dsv4.hooks import TrainStep, fake_quant_fp4
from dsv4.model import Transformer
from dsv4.train.config import TrainConfig, train_preset
from dsv4.train.recipe import SpikeDetector, forward_losses, mtp_targets
from dsv4.train.trainer import CheckpointMismatch, Trainer, read_metrics

ROOT = Path(__file__).resolve().parent.parent


def synthetic_docs(seed: int = 0, n: int = 60) -> dict:
    """Two small 'sources' of documents with learnable structure (counting runs), ids < 512."""
    gen = torch.Generator().manual_seed(seed)
    docs = {"a": [], "b": []}
    for i in range(n):
        start, length = int(torch.randint(2, 400, (1,), generator=gen)), int(torch.randint(10, 90, (1,), generator=gen))
        docs["a"].append(torch.arange(start, start + length) % 500 + 2)
        docs["b"].append(torch.randint(2, 40, (length,), generator=gen).repeat_interleave(2))
    return docs


def small_config(**kw) -> TrainConfig:
    base = dict(model="tiny", steps=6, batch_size=2, seq_len_schedule=[[0, 48], [3, 64]], lr=3e-3, warmup_steps=2,
                checkpoint_every=100, spike_warmup=100)
    return TrainConfig(**{**base, **kw})


def dp_config() -> TrainConfig:
    # Every phase: dense, indexer warm-up (backbone frozen), sparse. FP4 off: its rounding would turn
    # reduction-order differences (~1e-7) into visible ones.
    return small_config(steps=6, batch_size=4, dense_steps=2, indexer_warmup_steps=2, checkpoint_every=3)


def make_trainer(cfg: TrainConfig, out) -> Trainer:
    return Trainer(cfg, out, docs=synthetic_docs(), val_docs=synthetic_docs(seed=1))


# ---------------------------------------------------------------------------------------- config
def test_lr_schedule_warmup_constant_cosine_to_ten_percent():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, decay_steps=20)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(lr == 1.0 for lr in lrs[10:80])
    assert lrs[99] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_train_config_files_and_errors(tmp_path):
    (tmp_path / "a.toml").write_text('[train]\nmodel = "tiny"\nsteps = 7\nseq_len_schedule = [[0, 32], [4, 64]]\n')
    cfg = TrainConfig.from_file(tmp_path / "a.toml")
    assert cfg.steps == 7 and [cfg.seq_len_at(s) for s in (0, 3, 4, 6)] == [32, 32, 64, 64]
    (tmp_path / "b.json").write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ConfigError, match="stepz.*steps"):
        TrainConfig.from_file(tmp_path / "b.json")
    with pytest.raises(ConfigError, match="seq_len_schedule"):
        TrainConfig(seq_len_schedule=[[5, 64]])


# ---------------------------------------------------------------------------------------- pieces
def test_fp4_fake_quant_on_grid_with_straight_through_gradient():
    x = torch.randn(4, 64, requires_grad=True)
    q = fake_quant_fp4(x)
    scale = torch.exp2(torch.ceil(torch.log2(x.detach().view(4, 2, 32).abs().amax(-1, keepdim=True) / 6)))
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    vals = (q.detach().view(4, 2, 32) / scale).abs()
    assert torch.isclose(vals[..., None], grid).any(-1).all()
    assert (q - x).abs().max() < x.abs().max() / 4  # coarse, but a rounding of x
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_mtp_targets_stay_inside_documents():
    labels = torch.tensor([[5, 6, -100, 8, 9, 10]])
    next_ids, targets = mtp_targets(labels)
    assert next_ids.tolist() == [[5, 6, 0, 8, 9, 10]]
    assert targets.tolist() == [[6, -100, -100, 9, 10, -100]]


def test_anticipatory_route_override_picks_experts_from_old_router():
    model = Transformer(preset("tiny"), seed=0)
    gate = model.layers[1].ffn.gate
    x = torch.randn(10, 64)
    _, now, _ = gate(x, None)
    old_w = torch.randn_like(gate.weight)
    w, old, _ = gate(x, None, route_with=(old_w, torch.zeros_like(gate.bias)))
    expect = torch.nn.functional.softplus(x @ old_w.T).sqrt().topk(2, dim=-1).indices
    assert torch.equal(old.sort(-1).values, expect.sort(-1).values) and not torch.equal(old.sort(-1).values,
                                                                                         now.sort(-1).values)
    assert w.requires_grad  # the weights still come from the current router


def test_spike_detector():
    det = SpikeDetector(ratio=1.5, warmup=3, ema=0.5, hold=4)
    flags = [det.update(s, loss) for s, loss in enumerate([5, 4, 3, 3, 9, 3, 3])]
    assert flags == [False, False, False, False, True, False, False]
    assert [det.active(s) for s in range(3, 11)] == [False, False, True, True, True, True, False, False]


def test_training_masking_documents_do_not_leak():
    """Per-token losses of one document in a pack do not change when another document changes."""
    model = Transformer(preset("tiny").replace(initializer_range=0.2), seed=3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (1, 96), generator=gen)
    doc_ids = torch.tensor([[0] * 40 + [1] * 56])
    labels = torch.cat([ids[:, 1:], torch.tensor([[-100]])], 1)
    labels[0, 39] = -100

    def per_token(ids):
        logits = model(ids, doc_ids=doc_ids, step=TrainStep(attention="sparse", fp4_experts=True))
        return torch.nn.functional.cross_entropy(logits[0], labels[0].where(labels[0] >= 0, 0), reduction="none")

    with torch.no_grad():
        base = per_token(ids)
        other = ids.clone()
        other[0, :40] = torch.randint(0, 512, (40,), generator=gen)
        changed = per_token(other)
    assert torch.equal(base[40:], changed[40:]) and not torch.allclose(base[:39], changed[:39])


# ---------------------------------------------------------------------------------------- the loop
def test_curriculum_phases_and_freezing_follow_the_config(tmp_path):
    cfg = small_config(steps=7, dense_steps=2, indexer_warmup_steps=2, fp4_experts=True, fp4_indexer=True)
    t = make_trainer(cfg, tmp_path)
    idx = {n: p for n, p in t.model.named_parameters() if ".indexer." in n}
    snap = lambda: {n: p.detach().clone() for n, p in t.model.named_parameters()}  # noqa: E731
    seen = []
    for _ in range(cfg.steps):
        before = snap()
        rec = t.train_step()
        after = snap()
        changed = {n for n in after if not torch.equal(before[n], after[n])}
        seen.append((rec["phase"], rec["seq_len"], changed))
    assert [s[0] for s in seen] == ["dense"] * 2 + ["indexer_warmup"] * 2 + ["sparse"] * 3
    assert [s[1] for s in seen] == [48] * 3 + [64] * 4
    for phase, _, changed in seen:
        if phase == "dense":
            assert changed and not changed & set(idx)
        elif phase == "indexer_warmup":  # backbone frozen: only the indexer moves
            assert changed and changed <= set(idx)
        else:
            assert changed & set(idx) and changed - set(idx)
    recs = read_metrics(tmp_path / "metrics.jsonl") if (tmp_path / "metrics.jsonl").exists() else []
    assert recs == []  # train_step alone writes nothing; run() does


def test_grad_accum_equals_one_batch_of_all_rows(tmp_path):
    """2 micro-batches of 2 rows == 1 batch of 4 rows, across phases and a length change: every micro-batch's
    loss is divided by the whole step's target counts (the indexer's gradient by the step's KL count), so the
    gradients add up to the large batch's. Only the order of the sums differs: metrics agree to 1e-5
    (measured ~5e-7); parameters to 1e-4 after 4 steps (measured 1e-5: Muon's orthogonalisation of a
    near-zero gradient magnifies rounding)."""
    cfg = small_config(steps=4, dense_steps=1, indexer_warmup_steps=1)
    big = make_trainer(cfg.replace(batch_size=4), tmp_path / "big")
    acc = make_trainer(cfg.replace(batch_size=2, grad_accum=2), tmp_path / "acc")
    a, b = [big.train_step() for _ in range(4)], [acc.train_step() for _ in range(4)]
    assert [r["phase"] for r in a] == ["dense", "indexer_warmup", "sparse", "sparse"]
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a] == [192, 384, 576, 832]  # 4 rows x 48, then 64
    assert [r["batch_tokens"] for r in b] == [192, 192, 192, 256]
    for key in ("loss", "mtp_loss", "indexer_kl", "balance", "grad_norm"):
        assert max(abs(x[key] - y[key]) for x, y in zip(a, b)) < 1e-5, (key, a, b)
    sa, sb = big.model.state_dict(), acc.model.state_dict()
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-4


def test_spike_switches_anticipatory_routing_on_then_off(tmp_path):
    cfg = small_config(steps=12, spike_warmup=3, spike_ratio=1.3, anticipatory_steps=3, anticipatory_delay=2, lr=1e-4)
    t = make_trainer(cfg, tmp_path)
    recs = [t.train_step() for _ in range(5)]
    saved = t.model.head.weight.detach().clone()
    with torch.no_grad():
        t.model.head.weight.mul_(40)  # a sudden jump in the loss, for one step
    recs.append(t.train_step())
    with torch.no_grad():
        t.model.head.weight.copy_(saved)
    recs += [t.train_step() for _ in range(6)]
    spikes = [r["step"] for r in recs if r["spike"]]
    assert spikes and spikes[0] == 5
    on = [r["step"] for r in recs if r["anticipatory"]]
    last = spikes[-1]
    assert on == list(range(6, last + 4)) and not recs[-1]["anticipatory"]


def test_resume_equals_uninterrupted_bitwise(tmp_path):
    cfg = small_config(steps=6, checkpoint_every=3, fp4_experts=True, dense_steps=1, indexer_warmup_steps=1,
                       batch_size=1, grad_accum=2)
    whole = make_trainer(cfg, tmp_path / "whole")
    whole.run(progress=False)
    part = make_trainer(cfg, tmp_path / "part")
    part.run(steps=4, progress=False)  # checkpoints at 3 and 4; resume from 4, mid-way through a length
    resumed = make_trainer(cfg, tmp_path / "part")
    assert resumed.resume() and resumed.step == 4
    resumed.run(progress=False)
    a, b = read_metrics(tmp_path / "whole" / "metrics.jsonl"), read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(6))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b] == [96, 192, 288, 416, 544, 672]  # 2 x 48, 2 x 64
    sa, sb = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # router biases included
    assert sorted(p.name for p in (tmp_path / "part" / "checkpoints").glob("step_*")) == [
        "step_0000003", "step_0000004", "step_0000006"]
    assert (tmp_path / "part" / "loss.png").stat().st_size > 1000


def resumes_like_uninterrupted(tmp_path, rewrite) -> None:
    """Train 2 of 4 steps; `rewrite(state, trainer)` turns the step-2 checkpoint's train state into an older
    format (before the run steps on); resuming it must reach the uninterrupted run's loss and weights."""
    cfg = small_config(steps=4, checkpoint_every=2)
    whole = make_trainer(cfg, tmp_path / "whole")
    whole.run(steps=2, progress=False)
    old = tmp_path / "old"
    shutil.copytree(whole.out, old)
    state_file = old / "checkpoints" / "step_0000002" / "train_state.pt"
    torch.save(rewrite(torch.load(state_file, weights_only=False), whole), state_file)
    last = whole.run(progress=False)[-1]
    resumed = make_trainer(cfg, old)
    assert resumed.resume() and resumed.step == 2
    assert resumed.run(progress=False)[-1]["loss"] == last["loss"]
    sa, sb = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_reads_the_earlier_optimizer_format(tmp_path):
    """Checkpoints written before the optimizer state was kept by parameter name hold `Optimizer.state_dict()`
    (one file per rank): they still resume, with the number of processes that wrote them."""
    def by_rank(state, trainer):
        del state["optimizer_state"]
        return {**state, "optimizer": trainer.optimizer.state_dict()}
    resumes_like_uninterrupted(tmp_path, by_rank)


def test_resume_reads_per_expert_optimizer_state(tmp_path):
    """Checkpoints written before the routed experts were stacked keep their optimizer state per expert
    (`...experts.3.w1.weight`): it is stacked onto `...experts.w1`, so Muon's momentum survives the resume."""
    def per_expert(state, trainer):
        out = {}
        for name, st in state["optimizer_state"].items():
            prefix, _, w = name.rpartition(".")
            if prefix.endswith(".experts") and w in ("w1", "w2", "w3"):
                for e, buf in enumerate(st["momentum_buffer"]):
                    out[f"{prefix}.{e}.{w}.weight"] = {"momentum_buffer": buf.clone()}
            else:
                out[name] = st
        assert len(out) > len(state["optimizer_state"])  # the model has stacked experts with state
        return {**state, "optimizer_state": out}
    resumes_like_uninterrupted(tmp_path, per_expert)


def test_resume_with_a_different_config_is_a_clear_error(tmp_path):
    cfg = small_config(steps=2, checkpoint_every=2)
    make_trainer(cfg, tmp_path).run(progress=False)
    other = make_trainer(cfg.replace(model_overrides={"hidden_size": 32}), tmp_path)
    with pytest.raises(CheckpointMismatch, match="hidden_size: checkpoint 64 != config 32"):
        other.resume()


def test_cli_train_resume_and_refusal(tmp_path, capsys):
    from dsv4.cli import main

    cfg = small_config(steps=3, checkpoint_every=2, model_overrides={"vocab_size": 512})
    (tmp_path / "t.json").write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "t.json"), "--out", str(out), "--steps", "2", "--no-progress"]) == 0
    assert main(["train", "--config", str(tmp_path / "t.json"), "--out", str(out), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "t.json"), "--out", str(out), "--resume", "--no-progress"]) == 0
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2] and all({"step", "loss", "lr", "tokens"} <= set(r) for r in recs)
    assert (out / "loss.png").is_file() and (out / "checkpoints" / "step_0000003" / "model.safetensors").is_file()


def run_data_parallel(runs: list[dict], port: int = 29531) -> list[list[dict]]:
    """Run `runs` (see tests/train_dp_worker.py) under torchrun with 2 CPU ranks; their metrics records."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(ROOT / "tests" / "train_dp_worker.py"), json.dumps(runs)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(ln.removeprefix("RECORDS ")) for ln in res.stdout.splitlines() if ln.startswith("RECORDS ")]


def assert_same_run(one: list[dict], two: list[dict], tol: float) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two]
    assert [r["phase"] for r in one] == [r["phase"] for r in two]
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    for key in ("loss", "mtp_loss", "indexer_kl", "grad_norm"):
        diff = max(abs(a[key] - b[key]) for a, b in zip(one, two))
        assert diff < tol, (key, [r[key] for r in one], [r[key] for r in two])


def cut_back(src: Path, dst: Path, step: int) -> Path:
    """A copy of run folder `src` without its checkpoints after `step`: resuming it continues from `step`."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if int(ckpt.name.removeprefix("step_")) > step:
            shutil.rmtree(ckpt)
    return dst


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory) -> dict:
    """The data-parallel tests share one process's run and one torchrun launch (each start costs seconds):
    dp_config() in 1 process; then, with 2 ranks, the same config, the same with 2 micro-batches per step,
    and the 1-process run resumed from its step-3 checkpoint."""
    tmp = tmp_path_factory.mktemp("dp")
    one = make_trainer(dp_config(), tmp / "one").run(progress=False)
    cut_back(tmp / "one", tmp / "one_then_two", 3)
    two, accumulated, one_then_two = run_data_parallel([
        {"out": str(tmp / "two")},
        {"out": str(tmp / "acc"), "config": {"batch_size": 2, "grad_accum": 2}},
        {"out": str(tmp / "one_then_two"), "resume": True}])
    return {"dir": tmp, "one": one, "two": two, "accumulated": accumulated, "one_then_two": one_then_two}


def test_two_process_gloo_equals_one_process(dp_runs):
    """torchrun, 2 CPU ranks: FSDP2 for the dense parameters, expert parallelism for the routed experts,
    replicated indexers; dense -> indexer warm-up (backbone frozen) -> sparse. Tolerance: the two runs sum the
    same numbers in different orders (gradient reduction over ranks, expert outputs combined by all-reduce),
    ~1e-7 relative per step in fp32; measured: losses and KL within 1e-6 over the 6 steps. A real bug moves
    them by far more (a wrong row split or a double-counted gradient: > 1e-2 from the second step on; a
    later layer's KL or balance loss lost, as FSDP2's rebuilt TrainStep once did: ~1e-1 by step 5)."""
    one, two = dp_runs["one"], dp_runs["two"]
    assert [r["phase"] for r in one] == ["dense"] * 2 + ["indexer_warmup"] * 2 + ["sparse"] * 2
    assert_same_run(one, two, 1e-4)
    # the checkpoint written by the 2-rank run (shards and experts gathered) equals the 1-process one
    from dsv4.checkpoint import load

    a = load(str(dp_runs["dir"] / "one" / "checkpoints" / "step_0000006")).state_dict()
    b = load(str(dp_runs["dir"] / "two" / "checkpoints" / "step_0000006")).state_dict()
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3


def test_two_process_grad_accum_equals_one_process(dp_runs):
    """2 micro-batches of 1 row per rank (gradients reduce-scattered once per step) == 1 process, 4 rows."""
    assert_same_run(dp_runs["one"], dp_runs["accumulated"], 1e-4)


def test_checkpoint_resumes_with_another_number_of_processes(dp_runs):
    """Weights and optimizer state are saved whole, by name, and the data order is that of the global batch:
    a 1-process checkpoint continues on 2 ranks, a 2-rank one in 1 process, both as the uninterrupted run
    (to the data-parallel tolerance)."""
    one, tmp = dp_runs["one"], dp_runs["dir"]
    assert [r["step"] for r in dp_runs["one_then_two"]] == [3, 4, 5]
    assert_same_run(one[3:], dp_runs["one_then_two"], 1e-4)
    assert not list((tmp / "two").glob("checkpoints/*/train_state_rank*"))  # one state file, not one per rank
    resumed = make_trainer(dp_config(), cut_back(tmp / "two", tmp / "two_then_one", 3))
    assert resumed.resume() and resumed.step == 3
    two_then_one = resumed.run(progress=False)
    assert_same_run(one[3:], two_then_one, 1e-4)
    assert [r["step"] for r in read_metrics(tmp / "two_then_one" / "metrics.jsonl")] == list(range(6))


def test_tiny_run_on_the_bundled_corpus_learns(tmp_path):
    """The `tiny` recipe (all phases, FP4 QAT, MTP, Muon) on the bundled corpus: the next-token loss falls by
    at least 0.4 nats from its start (≈ ln 512 = 6.24, ids folded into 512) within 40 steps."""
    recs = Trainer(train_preset("tiny"), tmp_path).run(progress=False)
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-5:]) / 5
    assert first - last > 0.4, (first, last)
    assert recs[-1]["val_loss"] < first - 0.4


def test_activation_checkpointing_gives_the_same_gradients():
    """`TrainStep.checkpoint` recomputes each layer in the backward instead of keeping its activations: the
    loss, every gradient and the measurements (balance loss, indexer KL) must equal the plain pass's."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 48))
    doc_ids = torch.cat([torch.zeros(2, 20, dtype=torch.long), torch.ones(2, 28, dtype=torch.long)], dim=1)
    results = []
    for checkpoint in (False, True):
        model.zero_grad()
        step = TrainStep(indexer_loss=True, fp4_experts=True, checkpoint=checkpoint)
        loss = model(ids, doc_ids=doc_ids, step=step).logsumexp(-1).mean()
        aux = sum(v.sum() for v in step.balance_loss.values())
        (loss + aux).backward()
        results.append((loss.detach(), aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                       if p.grad is not None}))
    (l0, a0, g0), (l1, a1, g1) = results
    assert torch.equal(l0, l1) and torch.allclose(a0, a1)
    assert g0.keys() == g1.keys() and len(g0) > 20
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)
