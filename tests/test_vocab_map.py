"""Compact vocabulary: the VocabMap of a corpus, the tokenizer seen through it, checkpoints that carry it,
bitwise resume with it, and the `demo` recipe that uses it."""

import json

import pytest
import torch

from dsv4.checkpoint import load
from dsv4.chat import SPECIAL_TOKENS, encode_messages
from dsv4.errors import CheckpointError
from dsv4.generate import SamplingParams, generate
from dsv4.tokenizer import (UNK_PLACEHOLDER, VOCAB_MAP_NAME, CompactTokenizer, Tokenizer, VocabMap,
                            load_tokenizer, tokenizer_for)
from dsv4.train.config import TrainConfig, train_preset
from dsv4.train.trainer import CheckpointMismatch, Trainer, read_metrics

TEXTS = ["The cat sat on the mat. The dog sat on the log.", "def add(a, b):\n    return a + b\n",
         "Question: What is 12 + 30?\nAnswer: 42"] * 3


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


def specials(tok) -> list[int]:
    return [tok.bos_id, tok.eos_id] + [tok.token_to_id(t) for t in SPECIAL_TOKENS]


def docs_of(tok, texts=TEXTS) -> dict:
    return {"text": [torch.tensor(ids) for ids in tok.encode_batch(texts)]}


def test_vocab_map_is_deterministic_frequency_ordered_and_round_trips(tok, tmp_path):
    docs = docs_of(tok)["text"]
    a = VocabMap.from_docs(docs, 64, specials(tok), tok.vocab_size)
    b = VocabMap.from_docs(list(reversed(docs)), 64, specials(tok), tok.vocab_size)  # order does not matter
    assert a == b and len(a) == 64
    assert a.ids[:len(SPECIAL_TOKENS)] == list(dict.fromkeys(specials(tok))) and a.ids[a.unk] == -1
    counts = torch.bincount(torch.cat(docs).long(), minlength=tok.vocab_size)
    ranked = [counts[i].item() for i in a.ids[a.unk + 1:]]
    assert ranked == sorted(ranked, reverse=True)  # most frequent first; ids the corpus lacks (count 0) fill up
    assert VocabMap.load(a.save(tmp_path / VOCAB_MAP_NAME)) == a

    ct = CompactTokenizer(tok, a)
    assert (ct.vocab_size, ct.bos_id, ct.eos_id) == (64, a.ids.index(tok.bos_id), a.ids.index(tok.eos_id))
    for text in TEXTS:  # in-vocabulary text: text -> official -> compact -> official -> text
        official = tok.encode(text)
        compact = ct.encode(text)
        assert max(compact) < 64 and ct.unk_id not in compact
        assert a.to_official(compact) == official and ct.decode(compact) == text
    chat = encode_messages([{"role": "user", "content": "The cat"}], thinking_mode="chat")
    assert ct.decode(ct.encode(chat)) == chat  # every chat-format special token has its own id
    ids = ct.encode("The zebra sat")  # ' zebra' (two ids) is not in the corpus
    n_unk = ids.count(ct.unk_id)
    assert n_unk and ct.decode(ids) == "The" + UNK_PLACEHOLDER * n_unk + " sat"
    assert a.to_compact(torch.tensor([-100, tok.bos_id])).tolist() == [-100, a.ids.index(tok.bos_id)]


def compact_config(**kw) -> TrainConfig:
    base = dict(model="tiny", compact_vocab=64, steps=4, batch_size=2, seq_len_schedule=[[0, 24], [2, 32]], lr=3e-3,
                warmup_steps=1, dense_steps=1, indexer_warmup_steps=1, checkpoint_every=2, spike_warmup=100,
                fp4_experts=True)
    return TrainConfig(**{**base, **kw})


def make_trainer(cfg, out, tok) -> Trainer:
    return Trainer(cfg, out, tokenizer=tok, docs=docs_of(tok), val_docs=docs_of(tok, TEXTS[:2] + ["A zebra"]))


def test_checkpoint_carries_the_map_and_generate_uses_it(tok, tmp_path, capsys):
    from dsv4.cli import main

    t = make_trainer(compact_config(), tmp_path, tok)
    assert t.model_config.vocab_size == 64 and t.model.head.weight.shape[0] == 64
    recs = t.run(progress=False)
    assert recs[-1]["val_loss_full"] > recs[-1]["val_loss"]  # UNK targets pay for the id they stand for
    ckpt = t.latest_checkpoint()
    assert VocabMap.load(ckpt / VOCAB_MAP_NAME) == t.vocab_map
    ct = tokenizer_for(ckpt)
    assert isinstance(ct, CompactTokenizer) and ct.map == t.vocab_map
    assert isinstance(tokenizer_for("tiny"), Tokenizer)  # no map: the official tokenizer, unchanged
    model = load(str(ckpt))
    out = generate(model, ct.encode("The cat", add_bos=True), SamplingParams(max_new_tokens=6))
    assert len(out) == 6 and all(0 <= i < 64 for i in out)
    assert main(["generate", "--model", str(ckpt), "--prompt", "The cat", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("The cat" + ct.decode(out)) and "folded" not in printed.err

    (ckpt / VOCAB_MAP_NAME).write_text(json.dumps({**t.vocab_map.to_dict(), "ids": t.vocab_map.ids[:-1]}))
    with pytest.raises(CheckpointError, match="maps 63 ids but config.json has vocab_size 64"):
        load(str(ckpt))


def test_resume_with_compact_vocab_equals_uninterrupted_bitwise(tok, tmp_path):
    cfg = compact_config(steps=5)
    whole = make_trainer(cfg, tmp_path / "whole", tok)
    whole.run(progress=False)
    part = make_trainer(cfg, tmp_path / "part", tok)
    part.run(steps=3, progress=False)
    resumed = make_trainer(cfg, tmp_path / "part", tok)
    assert resumed.resume() and resumed.step == 3
    resumed.run(progress=False)
    a, b = read_metrics(tmp_path / "whole" / "metrics.jsonl"), read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and a[-1]["val_loss_full"] == b[-1]["val_loss_full"]
    sa, sb = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    other = Trainer(cfg, tmp_path / "part", tokenizer=tok, docs=docs_of(tok, TEXTS[1:] + ["A zebra"]),
                    val_docs=docs_of(tok, TEXTS[:2]))  # another corpus: another map
    with pytest.raises(CheckpointMismatch, match="compact vocabulary differs"):
        other.resume()


def test_compact_vocab_config_errors():
    with pytest.raises(Exception, match="compact_vocab"):
        TrainConfig(compact_vocab=8)
    with pytest.raises(Exception, match="compact_vocab"):
        TrainConfig(compact_vocab=128, model_overrides={"vocab_size": 512})
    assert TrainConfig(model="small", compact_vocab=4096).model_config().vocab_size == 4096


def test_demo_preset_builds_with_every_component_on_and_runs_two_steps(tmp_path):
    cfg = train_preset("demo")
    m = cfg.model_config()
    assert cfg.compact_vocab and m.vocab_size == cfg.compact_vocab
    assert {0, 4, 128} >= set(m.compress_ratios) and {4, 128} <= set(m.compress_ratios)  # CSA + HCA
    assert m.num_nextn_predict_layers and m.num_hash_layers and m.hc_mult > 1  # MTP, hash MoE, mHC
    assert cfg.optimizer == "muon" and cfg.fp4_experts and cfg.fp4_indexer
    assert cfg.dense_steps and cfg.indexer_warmup_steps and len(cfg.seq_len_schedule) > 1
    # a smoke run of the demo recipe on the bundled corpus: the first two steps, then validation and a checkpoint
    t = Trainer(cfg, tmp_path)
    recs = t.run(steps=2, progress=False)
    assert [r["phase"] for r in recs] == ["dense", "dense"] and "val_loss_full" in recs[-1]
    assert 0 < t.vocab_info["val_unk_share"] < 0.15
    assert (t.latest_checkpoint() / VOCAB_MAP_NAME).is_file()
