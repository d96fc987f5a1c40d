"""Reliability under faults (issue 14): the crash table, the network-fault table and the
bad-input list, measured with the harnesses the tests use (quantkit.testing's crash,
net_faults and bad_inputs).

    .venv/bin/python benchmarks/faults.py [--only crash net inputs] [--kills 20] [--kill-seed 2026]
                                          [--rates 0.05 0.1 0.2] [--seeds 1 2 3]

crash:  `quantkit build` (GPTQ + 2 GGUF on the tiny test model) SIGKILLed at seeded random
        moments of an uninterrupted build's duration, then run again; hashes compared.
net:    a fabricated build published to the local Hub failing a share of its requests at
        random (5xx, 429 + Retry-After, resets mid-upload, slow, lost answers); re-run until
        it succeeds; one variant rebuilt and published the same way; the Hub compared with
        the same steps without faults.
inputs: each bad input through `quantkit build`: exit code, files written, the message.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from quantkit.testing import table
from quantkit.testing.models import tiny_llama


CRASH_COLUMNS = ["kill", "at (s)", "doing when killed", "finished at kill", "re-runs", "re-run built", "rebuilt",
                 "stale lock taken over", "no partial file", "final hashes equal", "problems"]


def crash(kills: int, seed: int, group: bool) -> None:
    from quantkit.testing.crash import AFTER_VARIANT, crash_once, problems, random_kills, reference_build

    with tempfile.TemporaryDirectory(prefix="quantkit-crash-") as tmp:
        root = Path(tmp)
        ref = reference_build(root, tiny_llama())
        print(f"uninterrupted build: {ref.seconds:.1f} s, {len(ref.files)} files; kill moments seeded ({seed}), "
              f"one uniform in each {kills}th of 90 % of the build's duration (re-measured by a build that "
              f"ends first)\n")
        def show(r) -> None:  # type: ignore[no-untyped-def]
            print(f"kill{r.kill} (of {kills}): {'; '.join(problems(r)) or 'none'}", file=sys.stderr, flush=True)

        rows = [_crash_row(r) for r in random_kills(root, ref, kills, seed, group=group, done=show)]
        # Plus the moments random draws rarely hit: right after the 1st and the 2nd variant finished.
        for i, line in enumerate(AFTER_VARIANT, start=kills):
            r = crash_once(root, root / "recipe.toml", ref, i, 0.0, group=group, after=line)
            rows.append(_crash_row(r, f"after {line.strip('^ ')}"))
        print(table(CRASH_COLUMNS, rows))


def _crash_row(r, when: str | None = None) -> list[object]:  # type: ignore[no-untyped-def]
    from quantkit.testing.crash import problems

    wrong = problems(r)
    doing = r.phase[:44] if r.killed else "(had ended: not killed)"
    return [r.kill + 1, when or f"{r.at:.1f}", doing, len(r.done_at_kill), 1 if r.rerun_rc == 0 else "failed",
            " ".join(_short(n) for n in r.rerun_started) or "-", len(r.rerun_started),
            "yes" if r.took_over_note else "-", "yes" if not r.broken_at_kill else "NO",
            "yes" if not r.differences else "NO", "; ".join(wrong) or "none"]


def _short(variant: str) -> str:
    return variant.replace("-actorder_True", "").replace("gptq-4bit-32g", "gptq")


def net(rates: list[float], seeds: list[int]) -> None:
    from quantkit.testing.net_faults import fault_table

    rows = fault_table(rates, seeds)
    print(table(list(rows[0]), [list(r.values()) for r in rows]))


def inputs() -> None:
    from quantkit.testing.bad_inputs import CASES, run

    model = tiny_llama()
    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory(prefix="quantkit-input-") as tmp:
            got = run(Path(tmp), model, case)
            message = got.errors[0].replace(tmp, "…") if got.errors else got.output.strip()[-200:]
            rows.append([case.name, got.exit_code, len(got.written), message])
    print(table(["bad input", "exit", "files written", "message"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=["crash", "net", "inputs"], default=["crash", "net", "inputs"])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--kill-seed", type=int, default=2026)
    ap.add_argument("--pid-only", action="store_true",
                    help="SIGKILL the build's process only, not its llama.cpp children")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    a = ap.parse_args()
    if "inputs" in a.only:
        print("## bad inputs (`quantkit build`)\n")
        inputs()
    if "net" in a.only:
        print("\n## publish under network faults\n")
        net(a.rates, a.seeds)
    if "crash" in a.only:
        who = "its process only" if a.pid_only else "its process group"
        print(f"\n## build killed (SIGKILL to {who}) and run again\n")
        crash(a.kills, a.kill_seed, not a.pid_only)


if __name__ == "__main__":
    main()
