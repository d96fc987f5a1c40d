"""`quantkit init`: a starter recipe with the ladder TheBloke published for Llama models."""

from __future__ import annotations

import json

_TEMPLATE = """# Starter recipe written by `quantkit init`; edit it, then `quantkit plan` it.
[model]
source = {source}
revision = "main"
name = {name}
# display_name = "..."
# creator = "..."
# license = "llama2"
# prompt_template = "Du bist ein hilfreicher Assistent. USER: {{prompt}} ASSISTANT:"

[calibration]
dataset = "deepset/germanquad"      # GermanQuAD; a local SQuAD JSON/JSONL/parquet/txt works too
split = "train"
samples = 128
seq_len = 4096
seed = 0

[evaluation]                        # held out: never overlaps the calibration texts
dataset = "deepset/germanquad"
split = "test"
tokens = 16384
ctx = 512

[publish]
repo = "{{owner}}/{{name}}-{{FORMAT}}"
# owner = "your-hub-name"           # default: whoever the token belongs to
private = false

[gptq]
damp = 0.1
act_order = true

[[variants]]                        # main: 4-bit, group size 128, act order
format = "gptq"
bits = 4
group_size = 128
branch = "main"

[[variants]]
format = "gptq"
bits = [4, 8]
group_size = [32]

[[variants]]
format = "gptq"
bits = 8
group_size = [-1, 128]

[[variants]]
format = "awq"
bits = 4
group_size = 128

[[variants]]                        # the GGUF repo's main branch
format = "gguf"
quant = "Q4_K_M"
branch = "main"

[[variants]]
format = "gguf"
quant = ["Q2_K", "Q3_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
"""


def starter_recipe(model: str) -> str:
    name = model.rstrip("/").split("/")[-1]
    return _TEMPLATE.format(source=json.dumps(model), name=json.dumps(name))
