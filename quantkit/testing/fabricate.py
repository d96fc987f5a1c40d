"""Fabricated builds for card and publish tests and benchmarks.

A fabricated build is a build folder as the pipeline leaves it (one folder per variant with
real files, a manifest with their sizes and sha256) but with made-up weights and quality
numbers: the tests check layout, hashing and the Hub protocol, not quantization.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from quantkit.engines import gguf
from quantkit.manifest import Manifest, State, VariantRecord
from quantkit.plan import Plan, Variant, make_plan
from quantkit.recipe import parse_recipe
from quantkit.records import CalibrationRecord, QualityRecord, SourceRecord, file_entries

# 3 GPTQ branches + 2 GGUF types; the owner comes from the token (whoami).
DEMO_RECIPE = """
[model]
source = "src"
name = "tiny_german"
display_name = "Tiny German"
creator = "Quantkit Tests"
license = "apache-2.0"
prompt_template = "USER: {prompt} ASSISTANT:"

[calibration]
samples = 8
seq_len = 256

[gptq]
damp = 0.1

[[variants]]
format = "gptq"
bits = 4
group_size = 128
branch = "main"

[[variants]]
format = "gptq"
bits = [4, 8]
group_size = 32

[[variants]]
format = "gguf"
quant = ["Q4_K_M", "Q8_0"]
"""

SOURCE_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 768,
                 "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 1000}
SOURCE_README = """---
license: apache-2.0
language: [de]
---
# Tiny German

A two-layer test model. It speaks no German worth the name.
"""


@dataclass
class Build:
    plan: Plan
    manifest: Manifest
    out: Path

    def folder(self, name: str) -> Path:
        return self.out / name

    def variant(self, name: str) -> Variant:
        return next(v for v in self.plan.variants if v.name == name)


def _weights(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def fabricate_files(v: Variant, folder: Path, *, weight_bytes: int, seed: int) -> None:
    """What an engine leaves in a variant folder, with random weights of the given size."""
    rng = random.Random(f"{v.name}:{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    if v.format == "gguf":  # named as the engine names them; the imatrix beside the files it steered
        (folder / f"tiny_german.{v.name.removeprefix('gguf-')}.gguf").write_bytes(b"GGUF" + _weights(rng, weight_bytes))
        if gguf.SPEC.name == v.format and gguf.uses_imatrix(v.params_dict()):
            (folder / "tiny_german.imatrix").write_bytes(random.Random("imatrix").randbytes(4096))
        return
    (folder / "model.safetensors").write_bytes(_weights(rng, weight_bytes))
    (folder / "config.json").write_text(json.dumps({**SOURCE_CONFIG, "quantization_config": {
        "quant_method": "gptq", "bits": v.params.bits, "group_size": v.params.group_size}}, indent=2))
    (folder / "quantize_config.json").write_text(json.dumps({"bits": v.params.bits,
                                                             "group_size": v.params.group_size}))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(500)}}}))


def record(v: Variant, folder: Path, *, state: str = "evaluated", seed: int = 0) -> VariantRecord:
    """A manifest entry with measured sizes and hashes, and fixture quality numbers."""
    rng = random.Random(f"q:{v.name}:{seed}")
    files = tuple(f for f in file_entries(folder) if f.path not in ("README.md", "quality.png"))  # engines write neither
    delta = round(rng.uniform(0.5, 40.0), 2)
    return VariantRecord(format=v.format, branch=v.branch, repo=v.repo, state=State(state),
                         params=v.params_dict(), files=files, size_bytes=sum(f.size for f in files),
                         bits_per_weight=round(rng.uniform(4, 9), 3),
                         quality=QualityRecord(ppl=round(20 * (1 + delta / 100), 3), ref_ppl=20.0,
                                               delta_ppl_pct=delta, kld=round(delta / 100, 4), top1=0.9),
                         seconds=12.0, engine="fixture", engine_version="fixture 1.0")


def fabricate_build(root: Path, *, recipe_text: str = DEMO_RECIPE, weight_bytes: int = 200_000,
                    state: str = "evaluated") -> Build:
    """A recipe with a local source folder, and its build folder with every variant built."""
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text(json.dumps(SOURCE_CONFIG))
    (src / "README.md").write_text(SOURCE_README)
    recipe_path = root / "recipe.toml"
    recipe_path.write_text(recipe_text)
    recipe = parse_recipe(recipe_text, file=str(recipe_path), base_dir=root)
    out = root / "build"
    plan = make_plan(recipe, out)
    variants = {}
    for v in plan.variants:
        fabricate_files(v, plan.variant_dir(v), weight_bytes=weight_bytes, seed=0)
        variants[v.name] = record(v, plan.variant_dir(v), state=state)
    manifest = Manifest("0" * 64, variants,
                        calibration=CalibrationRecord("quantkit German sample", "c" * 64, samples=8, seq_len=256),
                        source=SourceRecord(architecture="LlamaForCausalLM", quantkit_version="0.1.0"))
    return Build(plan, manifest, out)


def rebuild(build: Build, name: str, *, seed: int = 1, keep_quality: bool = True) -> Build:
    """Simulate rebuilding one variant: new weight bytes, same size; quality unchanged or new."""
    v = build.variant(name)
    folder = build.folder(name)
    weights = next(p for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf"))
    size = weights.stat().st_size
    rng = random.Random(f"rebuild:{name}:{seed}")
    weights.write_bytes(weights.read_bytes()[:4] + rng.randbytes(size - 4))
    old = build.manifest.variants[name]
    new = record(v, folder, state="evaluated", seed=seed)
    if keep_quality:
        new = replace(new, quality=old.quality, bits_per_weight=old.bits_per_weight)
    build.manifest = build.manifest.with_variant(name, new)
    return build


def carded_build(root: Path, **kw: Any) -> Build:
    """fabricate_build with the cards written, as `quantkit build` leaves it."""
    from quantkit import card

    b = fabricate_build(root, **kw)
    b.manifest = card.write_cards(b.plan, b.manifest, b.out)
    return b


def publish_build(b: Build, **kw: Any) -> Any:
    """Publish the build; its manifest follows (as the CLI saves it)."""
    from quantkit import publish

    report = publish.publish(b.plan, b.manifest, b.out, **kw)
    b.manifest = report.manifest
    return report
