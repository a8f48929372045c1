"""The serving engine (no HTTP here): continuous batching, sampling, prefix caching, MTP speculative
decoding, batch-invariant mode, streaming callbacks, cancellation and a KV memory budget.

    engine = Engine(model, EngineConfig(...), decode=tokenizer.decode).start()
    handle = engine.submit(prompt_ids, SamplingParams(max_new_tokens=32), on_event=print)
    completion = handle.result()
"""

from ..generate import SamplingParams
from .engine import (Completion, Engine, EngineClosed, EngineConfig, EngineError, Event, RequestHandle,
                     RequestRejected, TokenLogprob, Usage, default_drafter, model_fingerprint)

__all__ = ["Engine", "EngineConfig", "SamplingParams", "RequestHandle", "Event", "Completion", "Usage",
           "TokenLogprob", "EngineError", "RequestRejected", "EngineClosed", "default_drafter", "model_fingerprint"]
