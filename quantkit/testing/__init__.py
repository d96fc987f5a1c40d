"""Harnesses the tests and the benchmark scripts share (as huggingface_hub ships its testing
utilities). Product code never imports this package (an import-linter contract in
pyproject.toml); it may import anything of quantkit.

    models        test models built offline and cached (SmolLM2, the tiny Llama)
    tables        markdown tables and a hash of GPTQ's packed tensors, for benchmark reports
    squad         SQuAD-format calibration documents of any size
    hub_server    a local Hub-API server (HubServer, use_hub, summarize), its parts in hub_*
    hub_stand_in  that server as a process of its own: python -m quantkit.testing.hub_stand_in
    fabricate     build folders with real files and made-up weights, for card and publish tests
    engine_bench  an engine on a test bench: context, calibration, reference, quality
    net_faults    publishing through a faulty network, compared with a fault-free run
    crash         `quantkit build` SIGKILLed at random moments, then run again
    bad_inputs    bad inputs a user can hand quantkit, each with its expected error
    scale         memory and time of a build at 7B widths (benchmarks/scale.py, tests/test_scale.py)

Only `models` and `tables` are imported here: both need nothing beyond the standard library
until called, so `import quantkit.testing` never loads huggingface_hub or torch.
"""

from quantkit.testing.models import CACHE, degridded_smollm2, smollm2
from quantkit.testing.tables import packed_sha, table

__all__ = ["CACHE", "degridded_smollm2", "packed_sha", "smollm2", "table"]
