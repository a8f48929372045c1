"""`make demo`: train a small DeepSeek-V4 on the bundled corpus on CPU, then let it talk.

Every component is on: CSA (with the lightning indexer) and HCA layers, mHC, hash-routed + learned MoE with
auxiliary-loss-free balancing, MTP, Muon, FP4 quantisation-aware training, the sequence-length curriculum
and the dense -> indexer warm-up -> sparse phases. The model's vocabulary is a compact map of the corpus
(`TrainConfig.compact_vocab`: the most frequent official ids, the chat format's special tokens and UNK), so
the step time goes to the transformer rather than to a 129K-way head. It writes ./runs/demo (checkpoints
with their vocab_map.json, metrics.jsonl, loss.png), prints a few sampled continuations and one chat turn
through the official chat format. About 4-5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv4.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--minutes", type=float, default=4.0, help="training time budget (stops early when reached)")
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args(argv)

    from dsv4.chat import encode_messages, parse_message_from_completion_text
    from dsv4.checkpoint import load
    from dsv4.generate import SamplingParams, generate
    from dsv4.info import describe
    from dsv4.tokenizer import tokenizer_for
    from dsv4.train.config import train_preset
    from dsv4.train.trainer import Trainer

    cfg = train_preset("demo")
    if args.steps:
        cfg = cfg.replace(steps=args.steps)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # the demo always starts afresh
    info = describe(cfg.model_config())["parameters"]
    print(f"[demo] model `{cfg.model}`: {info['total'] / 1e6:.1f}M parameters ({info['active'] / 1e6:.1f}M active), "
          f"layers {cfg.model_config().layer_types}, MTP, Muon; {cfg.steps} steps of up to "
          f"{cfg.batch_tokens} tokens, curriculum {cfg.seq_len_schedule}, dense {cfg.dense_steps} steps, "
          f"indexer warm-up {cfg.indexer_warmup_steps} steps, FP4 QAT"
          + (f", compact vocabulary of {cfg.compact_vocab:,} ids" if cfg.compact_vocab else ""))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, out)
    recs = trainer.run(max_seconds=args.minutes * 60)
    elapsed = time.perf_counter() - t0
    first, last = recs[0], recs[-1]
    print(f"[demo] trained {trainer.step} steps, {trainer.tokens:,} tokens in {elapsed / 60:.1f} min: "
          f"loss {first['loss']:.2f} -> {last['loss']:.2f}, validation {last.get('val_loss', float('nan')):.2f}")
    if "val_loss_full" in last:
        info = trainer.vocab_info
        print(f"[demo] compact vocabulary: {info['size']:,} ids; UNK stands for {info['val_unk_share']:.1%} of the "
              f"validation tokens. Over all 129,280 official ids (UNK resolved by the training corpus' unigram of "
              f"the ids it stands for) the validation loss is {last['val_loss_full']:.2f}: that number compares "
              f"with a run without the map")

    ckpt = trainer.latest_checkpoint()
    tok = tokenizer_for(ckpt)  # the checkpoint's compact vocabulary, from its vocab_map.json
    model = load(str(ckpt))
    params = SamplingParams(temperature=0.7, top_k=40, max_new_tokens=40, seed=0)
    for prompt in ("The old man", "def add(a, b):", "Question: What is 12 + 30?\nAnswer:"):
        ids = generate(model, tok.encode(prompt, add_bos=True), params, stop_ids={tok.eos_id})
        text = tok.decode([t for t in ids if t != tok.eos_id])
        print(f"\n[demo] >>> {prompt}{text}")

    # One chat turn through the official format: prompt text -> ids -> completion -> parsed message.
    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    prompt = encode_messages(messages, thinking_mode="chat")  # BOS User ... Assistant </think>
    ids = generate(model, tok.encode(prompt), params, stop_ids={tok.eos_id})
    message = parse_message_from_completion_text(tok.decode(ids), thinking_mode="chat")
    print("\n[demo] chat turn (the demo model is not instruction-tuned: this shows the pipeline - encode_messages "
          "-> generate -> parse_message_from_completion_text - not a useful answer)")
    print(f"[demo] prompt:            {prompt!r}")
    print(f"[demo] content:           {message['content']!r}")
    print(f"[demo] reasoning_content: {message['reasoning_content']!r}")
    print(f"\n[demo] loss curve: {(out / 'loss.png').resolve()}")
    print(f"[demo] checkpoint: {trainer.latest_checkpoint()}  (try: dsv4 generate --model {trainer.latest_checkpoint()} "
          f"--prompt 'The' --temperature 0.7)")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sys.exit(main())
