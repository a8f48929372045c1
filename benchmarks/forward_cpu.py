"""CPU forward throughput and peak memory: dsv4 vs transformers' DeepseekV4ForCausalLM on the same config
and weights, in one run. One JSON line per case; `ratio` = dsv4 tokens/s / transformers tokens/s.

    python benchmarks/forward_cpu.py [--presets tiny small] [--seq 512 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import threading
import time

import torch

from dsv4 import hf
from dsv4.config import preset
from dsv4.model import Transformer


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakRSS:
    """Samples the process RSS every millisecond; `peak` minus the RSS at entry = extra memory used."""

    def __enter__(self):
        gc.collect()
        self.base = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.extra = self.peak - self.base


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--seq", nargs="+", type=int, default=[512, 2048])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    for name in args.presets:
        config = preset(name)
        ours = Transformer(config).eval()
        ref = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**hf.to_hf_config(config))).eval()
        ref.load_state_dict(hf.to_hf_state_dict(ours.state_dict(), config), strict=False)
        for seq in args.seq:
            ids = torch.randint(0, config.vocab_size, (args.batch, seq))
            row = {"bench": "forward_cpu", "preset": name, "batch": args.batch, "seq": seq, "threads": args.threads,
                   "device": "cpu"}
            for label, fn in (("dsv4", lambda: ours(ids)), ("transformers", lambda: ref(ids).logits)):
                with torch.no_grad():
                    try:
                        with PeakRSS() as mem:
                            secs = timed(fn, args.repeats)
                        row[f"{label}_tokens_per_s"] = round(args.batch * seq / secs, 1)
                        row[f"{label}_peak_extra_mib"] = round(mem.extra / 2**20, 1)
                    except RuntimeError as e:  # e.g. out of memory
                        row[f"{label}_error"] = str(e)[:200]
            if "dsv4_tokens_per_s" in row and "transformers_tokens_per_s" in row:
                row["ratio"] = round(row["dsv4_tokens_per_s"] / row["transformers_tokens_per_s"], 2)
                row["memory_ratio"] = round(row["dsv4_peak_extra_mib"] / max(row["transformers_peak_extra_mib"], 1e-9), 2)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
