"""Harnesses the tests and the benchmark scripts share (as huggingface_hub ships its testing
utilities). Product code never imports this package; it may import anything of quantkit.

    models        test models built offline and cached (SmolLM2, the tiny Llama)
    tables        markdown tables and a hash of GPTQ's packed tensors, for benchmark reports
    squad         SQuAD-format calibration documents of any size
    hub_server    a local Hub-API server (HubServer, use_hub, summarize), its parts in hub_*
    hub_stand_in  that server as a process of its own: python -m quantkit.testing.hub_stand_in

Only `models` and `tables` are imported here: both need nothing beyond the standard library
until called, so `import quantkit.testing` never loads huggingface_hub or torch.
"""

from quantkit.testing.models import CACHE, smollm2
from quantkit.testing.tables import packed_sha, table

__all__ = ["CACHE", "packed_sha", "smollm2", "table"]
