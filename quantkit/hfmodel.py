"""A transformers checkpoint as a logits function: how users load fp16, GPTQ and AWQ weights.

Neutral (no quantkit imports but records) so that format modules and evaluation both use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .records import LogitsFn


@contextmanager
def hf_logits(path: Path, *, dtype: str = "float32", device: str = "cpu",
              **load_kwargs: Any) -> Iterator[LogitsFn]:
    """A transformers model as a logits function (the way users load GPTQ/AWQ/fp16)."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                 **load_kwargs)
    model = model.to(device) if not load_kwargs.get("device_map") else model
    model.eval()

    def fn(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.as_tensor(ids, dtype=torch.long, device=model.device)[None]
            return model(input_ids=x).logits[0].float().cpu().numpy()

    yield fn  # the model goes with this generator's frame when the with-block ends
