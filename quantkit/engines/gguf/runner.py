"""llama.cpp in-process through its Python bindings: a GGUF (one file or the first of its
shards) as a logits function, for evaluation and for the tuned mixes' probes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ... import toolchain as llamacpp
from ...errors import EngineError
from .tools import llama_threads

REUSE_MIN = 32  # a shared start shorter than this is not worth the bookkeeping


class LlamaRunner:
    """Opens the model on first use with a context as long as the chunks it is given."""

    def __init__(self, path: Path):
        llamacpp.require_bindings()
        self.path = path
        self.llm: Any = None
        self.n_ctx = 0

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        if self.llm is None or n > self.n_ctx:
            self._open(n)
        tokens = [int(i) for i in ids]
        keep = self._shared(tokens)
        self.llm.reset()
        self.llm.n_tokens = keep  # eval() drops the KV cache past it and keeps the prefix's scores
        self.llm.eval(tokens[keep:])
        # A view, not a copy (ctx x vocab floats: 100 MB for 512 tokens of a 49k vocabulary):
        # every caller reads it before its next call, which overwrites it.
        return self.llm.scores[:n]

    def rows(self, ids: np.ndarray, first: int) -> np.ndarray:
        """Logits of positions first..len(ids)-1 only, as llama-perplexity asks for them: llama.cpp
        then skips the output layer for the other positions (half a chunk), and nothing copies
        their rows. The KV cache is not kept for reuse afterwards."""
        import llama_cpp

        n = len(ids)
        if self.llm is None or n > self.n_ctx:
            self._open(n)
        llm, vocab = self.llm, self.llm.n_vocab()
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        out = np.empty((n - first, vocab), dtype=np.float32)
        tokens, batch, done = [int(i) for i in ids], llm._batch, 0
        for start in range(0, n, llm.n_batch):
            part = tokens[start:start + llm.n_batch]
            batch.set_batch(part, n_past=start, logits_all=False)
            for i in range(len(part)):
                batch.batch.logits[i] = start + i >= first or start + i == n - 1
            llm._ctx.decode(batch)
            k = sum(start + i >= first for i in range(len(part)))
            if k:
                got = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm._ctx.ctx), shape=(k * vocab,))
                out[done:done + k] = got.reshape(k, vocab)
                done += k
        llm.n_tokens = 0  # the Llama object's token history no longer matches the cache
        return out

    def _shared(self, tokens: list[int]) -> int:
        """Tokens at the start the last call evaluated too: a question's answers share it (context
        and question, most of each sequence), so it is evaluated once. Evaluation chunks share
        none; below REUSE_MIN tokens a shared start is evaluated again anyway."""
        done = self.llm.input_ids[: self.llm.n_tokens]
        k = 0
        for a, b in zip(done, tokens[:-1]):  # the last token is always evaluated: its logits
            if a != b:
                break
            k += 1
        recurrent = getattr(self.llm, "_is_recurrent", False) or getattr(self.llm, "_is_hybrid", False)
        return k if k >= REUSE_MIN and not recurrent else 0  # reset() clears a recurrent state

    def _open(self, n: int) -> None:
        from llama_cpp import Llama

        self.close()
        self.n_ctx = max(n, 16)
        try:
            self.llm = Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_batch=self.n_ctx,
                             n_ubatch=min(self.n_ctx, 512), logits_all=True, n_gpu_layers=0,
                             n_threads=llama_threads(), verbose=False)
        except (ValueError, RuntimeError) as e:
            raise EngineError("gguf", f"llama-cpp-python cannot load {self.path.name}: {e}") from None

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None
