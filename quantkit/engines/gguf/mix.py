"""Tuned per-tensor GGUF mixes: the byte budget of a stock type (or a bits-per-weight target),
spent where the calibration language needs it.

1. Sensitivity (a shared step, once per build): for every weight tensor of the decoder layers and
   every candidate type, the error that type adds, weighed by the German importance matrix:
   Σ_ij imp_j (W_ij − Ŵ_ij)², the squared error the tensor adds to its output per token of the
   calibration text. Ŵ comes from llama.cpp's own row quantizer (ggml.py: the same bytes
   llama-quantize writes) over an even sample of each tensor's rows, dequantized with gguf-py;
   a type a row length cannot take is measured as the type llama.cpp falls back to. That error
   ranks tensors within a class and depth, not across them: probes (probes.py) measure the KLD
   each class costs in each third of the layers and put every error in units of KLD.
2. Allocation (per variant): the stock type's own mix (`llama-quantize --dry-run`) gives the
   budget and the tensors left alone (embeddings and output: the importance matrix does not
   cover them; norms stay f32). The rest get the types that minimise the summed error within the
   budget: a Lagrangian relaxation of the multiple-choice knapsack, then a greedy fill.
3. The result is a `--tensor-type-file` (one exact-name rule per tensor), which stock
   `llama-quantize --pure` builds from: the file ships beside the GGUF, so anyone can rebuild it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import EngineError
from ...toolchain import Toolchain
from . import probes
from .ggml import dequantize_rows, quantize_rows, stored_type, tensor_bytes
from .header import TensorInfo, read_header, tensor
from .tools import explain, llama_threads, need_space, run

# The ggml types a tensor may get: the K-quants and 8-bit, and the i-quants and block-32 types
# between their sizes (IQ3_S at 3.44 bpw, IQ4_XS at 4.25, IQ4_NL and Q4_1 at 4.5: with an
# importance matrix they often beat the next K-quant per byte). A row length a type cannot take
# measures and gets llama.cpp's fallback instead.
CANDIDATES = ("Q2_K", "Q3_K", "IQ3_S", "IQ4_XS", "Q4_K", "IQ4_NL", "Q4_1", "Q5_K", "Q6_K", "Q8_0")
SAMPLE_ROWS = 128  # rows measured per tensor, evenly spaced: the error scales by rows / sample
# what the calibration depends on ("base": the probes' other tensors are the 16-bit file's own)
PROBES = (probes.LOW, tuple(probes.LOWER.items()), "no imatrix", "base", probes.PROBE_CTX, probes.PROBE_CHUNKS,
          probes.SCORE_FROM)
# A probe's KLD below this counts as barely sensitive: there is no floor to subtract, but a mean
# KLD of float32 logits this small is rounding as much as signal.
MIN_DKLD = 1e-6
_DRY = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\], type =\s*(\S+), size =\s*([\d.]+) MiB"
                  r"(?: ->\s*([\d.]+) MiB \((\S+)\))?")


def tunable(info: TensorInfo) -> bool:
    """The tensors an allocation chooses for: the decoder layers' matrices (the importance
    matrix measures their inputs). Embeddings, output, norms and 3-D expert stacks keep the
    stock mix's types."""
    n = info.name
    return n.startswith("blk.") and n.endswith(".weight") and len(info.dims) == 2 and "_norm" not in n


def tensor_class(name: str) -> str:
    """blk.3.attn_v.weight -> attn_v (what the summaries group by)."""
    return name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]


# ---------------------------------------------------------------- 1. sensitivity


@dataclass(frozen=True)
class Probe:
    """One calibration probe: a tensor class in a range of layers at the low type."""

    cls: str
    first: int  # layers first..last
    last: int
    predicted: float  # the group's summed weighted error at the probe type
    measured: float  # its mean KLD against the 16-bit file, on calibration text

    def holds(self, name: str) -> bool:
        return tensor_class(name) == self.cls and self.first <= _layer(name) <= self.last

    @property
    def scale(self) -> float:
        """KLD per unit of weighted error (a probe below the noise counts as barely sensitive)."""
        return max(self.measured, MIN_DKLD) / max(self.predicted, 1e-30)


@dataclass(frozen=True)
class Sensitivity:
    """tensor -> {ggml type: (bytes, weighted error)} and the probes that calibrate it; `table`:
    the errors in units of KLD (each scaled by its group's probe). `path`: the file on disk."""

    proxy: dict[str, dict[str, tuple[int, float]]]
    probes: tuple[Probe, ...]
    path: Path

    @property
    def table(self) -> dict[str, dict[str, tuple[int, float]]]:
        scale = {n: self.scale(n) for n in self.proxy}
        return {n: {t: (b, e * scale[n]) for t, (b, e) in row.items()} for n, row in self.proxy.items()}

    def scale(self, name: str) -> float:
        """KLD per unit of error for one tensor: its class's probes, log-linear across depth
        between the centres of their layer ranges (sensitivity changes smoothly with depth; a
        step at each third's edge would move whole groups on a small difference), flat beyond
        the first and last centre."""
        own = sorted(((p.first + p.last) / 2, math.log(p.scale)) for p in self.probes
                     if p.cls == tensor_class(name))
        if not own:
            return 1.0
        at = _layer(name)
        xs, ys = [x for x, _ in own], [y for _, y in own]
        return math.exp(float(np.interp(at, xs, ys)))

    @classmethod
    def load(cls, path: Path) -> Sensitivity:
        doc = json.loads(path.read_text(encoding="utf-8"))
        proxy = {t: {k: (int(v[0]), float(v[1])) for k, v in c.items()} for t, c in doc["proxy"].items()}
        return cls(proxy, tuple(Probe(**p) for p in doc["probes"]), path)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".partial")
        tmp.write_text(json.dumps({"proxy": self.proxy, "probes": [p.__dict__ for p in self.probes]}),
                       encoding="utf-8")
        tmp.replace(self.path)


def _layer(name: str) -> int:
    return int(name.split(".")[1])


def importance(imatrix: Path) -> dict[str, np.ndarray]:
    """Per weight tensor: the mean squared input activation per column (in_sum2 / counts), as
    llama-quantize reads it."""
    h = read_header(imatrix)
    infos = {i.name: i for i in h["infos"]}
    out = {}
    for name, info in infos.items():
        if name.endswith(".in_sum2"):
            w = name[: -len(".in_sum2")]
            sums = tensor(imatrix, info).reshape(-1)
            counts = tensor(imatrix, infos[w + ".counts"]).reshape(-1)
            out[w] = (sums / max(float(counts[0]), 1.0)).astype(np.float32)
    return out


Progress = Callable[[str, int, int], None]


def sensitivity(tc: Toolchain, base: Path, imatrix: Path, text: Path, tokens: int, out: Path,
                progress: Progress) -> Sensitivity:
    """The table and its probes, written to `out` (read back when it is there). `text`: the
    calibration text the probes score, `tokens` long."""
    if out.is_file():
        return Sensitivity.load(out)
    proxy = weighted_errors(tc.quantize.parent, base, imatrix, progress)
    sens = Sensitivity(proxy, calibrate(tc, base, imatrix, proxy, text, probes.probe_ctx(tokens), out.parent,
                                        progress), out)
    sens.save()
    return sens


def weighted_errors(tools_dir: Path, base: Path, imatrix: Path, progress: Progress) -> dict[str, dict[str, tuple[int, float]]]:
    """Every tunable tensor's (bytes, importance-weighted error) per type it can be stored as."""
    imp = importance(imatrix)
    infos = [i for i in read_header(base)["infos"] if tunable(i)]
    table: dict[str, dict[str, tuple[int, float]]] = {}
    progress("tensor sensitivity", 0, len(infos))
    with ThreadPoolExecutor(llama_threads()) as pool:  # ggml's quantizers release the GIL
        for n, (name, row) in enumerate(pool.map(lambda i: (i.name, _measure(tools_dir, base, i, imp.get(i.name))),
                                                  infos), 1):
            table[name] = row
            progress("tensor sensitivity", n, len(infos))
    return table


def groups(names: list[str]) -> list[tuple[str, int, int]]:
    """(class, first layer, last layer): each class in each third of the layers."""
    n = 1 + max(_layer(x) for x in names)
    thirds = [(k * n // 3, (k + 1) * n // 3 - 1) for k in range(3) if (k + 1) * n // 3 > k * n // 3]
    return [(c, a, b) for c in dict.fromkeys(tensor_class(x) for x in names) for a, b in thirds]


def calibrate(tc: Toolchain, base: Path, imatrix: Path, proxy: dict[str, dict[str, tuple[int, float]]], text: Path,
              ctx: int, work: Path, progress: Progress) -> tuple[Probe, ...]:
    """One probe per group, scored against the 16-bit GGUF on the calibration text."""
    work.mkdir(parents=True, exist_ok=True)
    # a pure low file (~0.3 of the 16-bit file), the base split into shards, the low shards
    need_space(work, int(1.7 * base.stat().st_size), "the calibration probes", None)
    todo = groups(list(proxy))
    members = [[t for t in proxy if Probe(c, a, b, 0.0, 0.0).holds(t)] for c, a, b in todo]
    progress("calibration probes", 0, len(todo))
    errors = probe_errors(tc.quantize.parent, base, imatrix, list(proxy))
    low = probes.low_file(tc, base, work / f"probe-{probes.LOW}.gguf")
    shard_dir = work / "shards"
    try:
        sh = probes.shards(shard_dir, base, low, members)
        low.unlink()
        scorer = probes.Scorer(base, text, ctx)
        found = []
        for n, ((cls, first, last), group) in enumerate(zip(todo, members, strict=True), 1):
            measured = scorer.kld(sh.probe(frozenset({n - 1})))
            found.append(Probe(cls, first, last, sum(errors[t] for t in group), measured))
            progress("calibration probes", n, len(todo))
    finally:
        low.unlink(missing_ok=True)
        shutil.rmtree(shard_dir, ignore_errors=True)
    return tuple(found)


def probe_errors(tools_dir: Path, base: Path, imatrix: Path, names: list[str]) -> dict[str, float]:
    """Each tensor's weighted error at the probe type, quantized as the probe file has it (without
    the importance matrix) and weighed by it, as the table's errors are."""
    imp, wanted = importance(imatrix), set(names)
    infos = [i for i in read_header(base)["infos"] if i.name in wanted]

    def one(info: TensorInfo) -> tuple[str, float]:
        rows, w = _sampled(base, info)
        gtype = stored_type(probe_type(info.name), info.dims[0])
        return info.name, _error(tools_dir, w, gtype, None, imp.get(info.name), info.dims[1] / len(rows))

    with ThreadPoolExecutor(llama_threads()) as pool:
        return dict(pool.map(one, infos))


def probe_type(name: str) -> str:
    """The type the probe file asks for this tensor (before any fallback its rows need)."""
    return probes.LOWER.get(tensor_class(name), probes.LOW)


def sample(n_rows: int) -> np.ndarray:
    return np.unique(np.linspace(0, n_rows - 1, min(n_rows, SAMPLE_ROWS)).round().astype(np.int64))


def _measure(tools_dir: Path, base: Path, info: TensorInfo, imp: np.ndarray | None) -> dict[str, tuple[int, float]]:
    """(bytes of the whole tensor, estimated weighted error) for each type it can be stored as."""
    rows, w = _sampled(base, info)
    scale = info.dims[1] / len(rows)
    return {gtype: (tensor_bytes(gtype, info.dims), _error(tools_dir, w, gtype, imp, imp, scale))
            for gtype in dict.fromkeys(stored_type(c, info.dims[0]) for c in CANDIDATES)}


def _sampled(base: Path, info: TensorInfo) -> tuple[np.ndarray, np.ndarray]:
    """The rows a tensor's errors are measured on, and their values."""
    rows = sample(info.dims[1])
    return rows, tensor(base, info, rows)


def _error(tools_dir: Path, w: np.ndarray, gtype: str, quant_imp: np.ndarray | None, weight: np.ndarray | None,
           scale: float) -> float:
    """Σ_ij weight_j (W_ij − Ŵ_ij)² over the sampled rows, times `scale` for the whole tensor;
    Ŵ quantized with `quant_imp` as llama-quantize would."""
    wq = dequantize_rows(quantize_rows(tools_dir, gtype, w, quant_imp), gtype, w.shape[1])
    weight = np.ones(w.shape[1], dtype=np.float32) if weight is None else weight
    return float((((wq - w) ** 2) @ weight).astype(np.float64).sum()) * scale


# ---------------------------------------------------------------- 2. allocation


@dataclass(frozen=True)
class Mix:
    """Every tensor's type, and what the budget and the stock mix were."""

    types: dict[str, str]  # tensor -> ggml type name
    budget: int  # bytes the tensors may take (the stock file's, or bits per weight x weights)
    bytes: int  # bytes they take
    stock: dict[str, str]  # the stock type's own choice per tensor
    error: float  # predicted summed error (the allocation's objective)
    stock_error: float

    def rules(self) -> str:
        """The `--tensor-type-file`: one exact-name rule per quantized tensor (llama-quantize reads
        whitespace-separated tokens and lowercases the pattern, which tensor names already are;
        f32 tensors, the norms, are never quantized)."""
        return "".join(f"^{re.escape(name)}$={gtype.lower()}\n"
                       for name, gtype in sorted(self.types.items(), key=lambda kv: _order(kv[0])) if gtype != "F32")


def _order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]) if name.startswith("blk.") else -1, name)


def stock_mix(tc: Toolchain, base: Path, imatrix: Path | None, ftype: str) -> dict[str, tuple[str, int]]:
    """What `llama-quantize FTYPE` gives each tensor (type, bytes), without writing the file."""
    cmd: list[str | Path] = [tc.quantize, "--dry-run"]
    if imatrix is not None:
        cmd += ["--imatrix", imatrix.name]
    res = run(cmd + [base.resolve(), ftype, str(llama_threads())], cwd=imatrix.parent if imatrix else None)
    if res.returncode != 0:
        raise EngineError("gguf", explain(res, f"sizing the stock {ftype} mix", base.parent))
    sizes = {i.name: i for i in read_header(base)["infos"]}
    out = {}
    for line in res.log.splitlines():
        if m := _DRY.match(line):
            name, src, _, _, new = m.groups()
            gtype = (new or src).upper()
            out[name] = (gtype, tensor_bytes(gtype, sizes[name].dims))
    if len(out) != len(sizes):
        raise EngineError("gguf", f"llama-quantize --dry-run listed {len(out)} of {len(sizes)} tensors")
    return out


def budget_for(stock: dict[str, tuple[str, int]], infos: list[TensorInfo], target_bpw: float | None) -> int:
    """Tensor bytes a tuned mix may take: the stock mix's, or bits per weight over every weight
    (the file adds its header, the same for both)."""
    if target_bpw is None:
        return sum(b for _, b in stock.values())
    return int(target_bpw * sum(math.prod(i.dims) for i in infos) / 8)


def allocate(sens: Sensitivity, stock: dict[str, tuple[str, int]], budget: int) -> Mix:
    """The types that minimise the summed error with every tensor's bytes within `budget`."""
    table = sens.table  # computed on each access: once here
    fixed = {n: t for n, (t, _) in stock.items() if n not in table}
    room = budget - sum(b for n, (_, b) in stock.items() if n not in table)
    options = {n: sorted(c.items(), key=lambda kv: kv[1][0]) for n, c in table.items()}
    smallest = budget - room + sum(o[0][1][0] for o in options.values())
    if budget < smallest:
        raise EngineError("gguf", f"a budget of {budget / 1e6:.1f} MB is below the smallest mix the candidate "
                          f"types allow ({smallest / 1e6:.1f} MB with every layer matrix at its smallest type): "
                          "raise target_bpw or pick a larger target")
    pick = _lagrange(options, room)
    pick = _fill(options, pick, room)
    types = {**fixed, **{n: options[n][i][0] for n, i in pick.items()}}
    used = sum(b for n, (_, b) in stock.items() if n not in table) + \
        sum(options[n][i][1][0] for n, i in pick.items())
    error = sum(options[n][i][1][1] for n, i in pick.items())
    stock_error = sum(table[n].get(t, (0, math.nan))[1] for n, (t, _) in stock.items() if n in table)
    return Mix(types, budget, used, {n: t for n, (t, _) in stock.items()}, error, stock_error)


def _lagrange(options: dict[str, list[tuple[str, tuple[int, float]]]], room: int) -> dict[str, int]:
    """For a price λ per byte each tensor takes argmin(error + λ·bytes); bisect λ until the picks fit."""
    def picks(lam: float) -> dict[str, int]:
        return {n: min(range(len(o)), key=lambda i: o[i][1][1] + lam * o[i][1][0]) for n, o in options.items()}

    def size(p: dict[str, int]) -> int:
        return sum(options[n][i][1][0] for n, i in p.items())

    lo, hi = 0.0, 1.0
    while size(picks(hi)) > room:
        hi *= 4
    for _ in range(100):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
        if size(picks(mid)) > room:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * hi:
            break
    return picks(hi)


def _fill(options: dict[str, list[tuple[str, tuple[int, float]]]], pick: dict[str, int], room: int) -> dict[str, int]:
    """Spend what the relaxation left: the upgrade with the most error saved per byte, while it fits."""
    pick = dict(pick)
    left = room - sum(options[n][i][1][0] for n, i in pick.items())
    while True:
        best, gain = None, 0.0
        for n, i in pick.items():
            b0, e0 = options[n][i][1]
            for j, (_, (b1, e1)) in enumerate(options[n]):
                extra = b1 - b0
                if e1 < e0 and 0 < extra <= left and (e0 - e1) / extra > gain:
                    best, gain = (n, j, extra), (e0 - e1) / extra
        if best is None:
            return pick
        pick[best[0]], left = best[1], left - best[2]


# ---------------------------------------------------------------- 3. building it


def rebuild_command(rules: str, imatrix: str, base: str, out: str, ftype: str, overrides: list[str]) -> str:
    """The stock llama.cpp command that builds the tuned file from the published rules, byte for
    byte (the file type only labels the file: every quantized tensor has its rule)."""
    import shlex

    return shlex.join(["llama-quantize", *overrides, "--pure", "--tensor-type-file", rules, "--imatrix", imatrix,
                       base, out, ftype])


def wrong_types(mix: Mix, written: dict[str, str]) -> list[str]:
    """Tensors of the written file whose type is not the one the mix chose."""
    return [f"{n}: {written.get(n)} (chose {t})" for n, t in mix.types.items() if written.get(n) != t]


def summary_line(mix: Mix) -> str:
    """`attn_v 20 up; ffn_up 12 down, ...`: the classes that moved against the stock mix."""
    parts = []
    for cls, c in sorted(summary(mix).items()):
        moved = [f"{c[k]} {k}" for k in ("up", "down") if c[k]]
        if moved:
            parts.append(f"{cls} {', '.join(moved)}")
    return "; ".join(parts) or "the stock mix's types"


def summary(mix: Mix) -> dict[str, dict[str, int]]:
    """Per tensor class: how many tensors went up, stayed or went down against the stock mix
    (by bits per weight of their types)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    def bpw(t: str) -> float:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t]]
        return 8 * size / block

    out: dict[str, dict[str, int]] = {}
    for name, t in mix.types.items():
        s = mix.stock.get(name, t)
        row = out.setdefault(tensor_class(name), {"up": 0, "same": 0, "down": 0})
        row["up" if bpw(t) > bpw(s) else "down" if bpw(t) < bpw(s) else "same"] += 1
    return out
