"""Mutation check: deliberate bugs in the GN linearisation must make the exactness tests fail, and deliberate bugs
in a study's search, selection and statistics (the numbers a report quotes) must make their tests fail.

Run as ``python tests/mutation_check.py`` from anywhere (``--list`` prints the mutations, ``-k TEXT`` runs those whose
name contains TEXT). Not a pytest module: pytest collects ``test_*.py`` only, and nothing here is named ``test_*``.

Each mutation is (file under the repository, an exact snippet of the current source, its replacement, what it
breaks, and the test files that must catch it). The snippet must occur exactly once, so the list fails loudly
when the source moves on rather than silently testing nothing. For each mutation ``src/`` is copied to a temporary
directory, the snippet replaced, and its test files run against the copy (``PYTHONPATH=<tmp>/src``; the test
process asserts that ``gnlm`` is imported from there) with ``-x``. A mutation is *caught* when some test fails.
The unmutated copy must pass each set of test files first. Exits non-zero if an unmutated run fails, a snippet does
not match, a mutation breaks collection instead of a test, or a mutation survives.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXACTNESS_TESTS = ("tests/test_curvature.py", "tests/test_model.py")
STUDY_TESTS = ("tests/test_analysis.py", "tests/test_search.py")
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider"]
TIMEOUT_S = 900
NAME_WIDTH = 36  # the longest mutation name, for aligned columns


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root, under src/
    original: str
    mutated: str
    description: str
    tests: tuple[str, ...] = EXACTNESS_TESTS  # the test files that must catch it


MODEL, CURV = "src/gnlm/model.py", "src/gnlm/curvature.py"
ANALYSIS, STATS, SEARCH, SELECTION, RESULTS, PLAN = ("src/gnlm/analysis.py", "src/gnlm/stats.py", "src/gnlm/search.py",
                                                     "src/gnlm/selection.py", "src/gnlm/results.py", "src/gnlm/plan.py")

MUTATIONS = [
    Mutation("rms-tangent-weight", MODEL,
             "n = x * r  # as RMSNorm.forward computes it\n    rw = r * w\n",
             "n = x * r  # as RMSNorm.forward computes it\n    rw = r\n",
             "RMSNorm tangent drops the norm weight (r·w -> r)"),
    Mutation("rms-primal-weight", MODEL,
             "    return n * w, jvp\n",
             "    return n, jvp\n",
             "RMSNorm stage output drops the norm weight (the primal, not the tangent)"),
    Mutation("ln-tangent-weight", MODEL,
             "rw = rstd * w\n",
             "rw = rstd\n",
             "LayerNorm (QK-norm) tangent drops the norm weight (rstd·w -> rstd)"),
    Mutation("ln-tangent-bias", MODEL,
             "return _plus(y_t, None if b_t is None else b_t.expand_as(n))",
             "return y_t",
             "LayerNorm (QK-norm) tangent drops the bias tangent"),
    Mutation("ln-primal-bias", MODEL,
             "torch.native_layer_norm(x, (x.shape[-1],), w, b, eps)",
             "torch.native_layer_norm(x, (x.shape[-1],), w, None, eps)",
             "LayerNorm (QK-norm) stage output drops the bias (the primal, not the tangent)"),
    Mutation("rope-tangent-sin-sign", MODEL,
             "torch.stack((-sin, sin), -1)",
             "torch.stack((sin, -sin), -1)",
             "RoPE of a tangent rotates the wrong way (sines' signs swapped)"),
    Mutation("rope-tangent-cos-layout", MODEL,
             "cos2, sin2 = cos.repeat_interleave(2, -1),",
             "cos2, sin2 = cos.repeat(1, 2),",
             "RoPE of a tangent lays the cosines out as halves instead of interleaved pairs"),
    Mutation("rope-tangent-not-applied", MODEL,
             "_bmm(q, rope_t(heads(k_t)).transpose(-2, -1))",
             "_bmm(q, heads(k_t).transpose(-2, -1))",
             "RoPE not applied to the key tangent"),
    Mutation("softmax-tangent-no-subtraction", MODEL,
             "torch._softmax_backward_data(s_t.to(att.dtype), att, -1, att.dtype)",
             "(att * s_t.to(att.dtype))",
             "attention softmax tangent a ⊙ (s_t − Σ a s_t) loses its subtraction term"),
    Mutation("gelu-derivative-exact-not-tanh", MODEL,
             'dg = torch.ops.aten.gelu_backward(torch.ones_like(h1), h1, approximate="tanh")',
             'dg = torch.ops.aten.gelu_backward(torch.ones_like(h1), h1, approximate="none")',
             "MLP tangent uses the exact-erf GELU derivative while the forward is tanh-GELU (coefficients differ)"),
    Mutation("gelu-derivative-scaled", MODEL,
             'dg = torch.ops.aten.gelu_backward(torch.ones_like(h1), h1, approximate="tanh")',
             'dg = 1.01 * torch.ops.aten.gelu_backward(torch.ones_like(h1), h1, approximate="tanh")',
             "MLP tangent's GELU derivative off by 1%"),
    Mutation("hvp-no-rank-one-term", CURV,
             "return u.sub_(_rowdot(self.pn, u), alpha=self.n).mul_(self.pn)",
             "return u.mul_(self.pn)",
             "logit-space H u (GGN-vector products, CG) loses its −p (pᵀu) term"),
    Mutation("hvp-wrong-scale", CURV,
             "return u.sub_(_rowdot(self.pn, u), alpha=self.n).mul_(self.pn)",
             "return u.sub_(_rowdot(self.pn, u), alpha=self.n).mul_(self.pn * self.n)",
             "logit-space H u (GGN-vector products, CG) misses the 1/N of the mean loss"),
    Mutation("gn-terms-no-rank-one-term", CURV,
             "torch.addcmul(pn, pn, u.sub_(s, alpha=n), out=u)",
             "torch.addcmul(pn, pn, u, out=u)",
             "GN surrogate cotangent g + H u loses the −p (pᵀu) term of H u"),
    Mutation("layerwise-prox-linear-loss", CURV,
             "loss = loss0 + (torch.stack(parts) - loss0).sum()",
             "loss = torch.stack(parts).sum()",
             "layerwise prox_linear value counts ℓ(z₀) once per block (gradient unchanged)"),
    # a study's search, selection and statistics
    Mutation("zhang-cbs-reference-unscaled", STATS,
             "return CBS_EXCESS * b_crit + (1 + CBS_EXCESS) * b_ref",
             "return CBS_EXCESS * b_crit + b_ref",
             "Zhang et al.'s CBS drops the 1.2 on the reference batch", STUDY_TESTS),
    Mutation("fit-never-zero-b-crit", STATS,
             "if loss_at(0.0)[0] <= loss_at(b_crit)[0]:",
             "if False:",
             "the S(B) fit never considers B_crit = 0 (no gain from batch size)", STUDY_TESTS),
    Mutation("crossover-interpolation-flipped", STATS,
             "return b0 * (b1 / b0) ** (l0 / (l0 - l1)), \"exact\"",
             "return b0 * (b1 / b0) ** (l1 / (l1 - l0)), \"exact\"",
             "the FLOPs/time crossover interpolates from the wrong end of its bracket", STUDY_TESTS),
    Mutation("crossover-misses-cheaper-at-smallest", STATS,
             "if pts[0][1] > 0:\n        return pts[0][0], \"at_or_below\"",
             "if pts[0][1] > 1e9:\n        return pts[0][0], \"at_or_below\"",
             "GN cheaper already at the smallest batch is not reported as at_or_below", STUDY_TESTS),
    Mutation("doubling-saving-unscaled", STATS,
             "return 1.0 - (s_end / s0) ** (1.0 / span)",
             "return 1.0 - s_end / s0",
             "the saving per doubling is not scaled to one doubling past the largest batch", STUDY_TESTS),
    Mutation("choice-edge-high-missed", SEARCH,
             'return "high" if t >= hi else "low" if t <= lo else None',
             'return "low" if t <= lo else None',
             "a best value on the highest choice is not an edge (no extension)", STUDY_TESTS),
    Mutation("extension-low-wrong-side", SEARCH,
             't = hi + step if side == "high" else lo - step',
             't = hi + step if side == "high" else lo + step',
             "the point beyond a low edge lies inside the range", STUDY_TESTS),
    Mutation("refinement-not-sqrt2", SEARCH,
             "2.0 ** (((i // 2) + 1) / 2 * (1 if i % 2 == 0 else -1))",
             "2.0 ** (((i // 2) + 1) * (1 if i % 2 == 0 else -1))",
             "the lr refinement steps ×2 instead of ×√2", STUDY_TESTS),
    Mutation("search-seed-ignores-method", SEARCH,
             'f"{method}/b{batch_tokens}/s{selection_seed}"',
             'f"b{batch_tokens}/s{selection_seed}"',
             "every method gets the same Sobol points at a batch size", STUDY_TESTS),
    Mutation("selection-ties-to-higher-loss", SELECTION,
             "return steps_to(row, target), math.inf if bad else float(final)",
             "return steps_to(row, target), math.inf if bad else -float(final)",
             "runs tied in steps are ranked by the higher final loss", STUDY_TESTS),
    Mutation("crossing-not-interpolated", RESULTS,
             "t = 1.0 if prev is None else (prev[\"eval_loss\"] - target) / (prev[\"eval_loss\"] - loss)",
             "t = 1.0",
             "steps to a target are the first evaluation at or below it, not the interpolated crossing",
             STUDY_TESTS),
    Mutation("extensions-eat-the-refinement", PLAN,
             "extension_points(study, m, batch, rows, budget - study.refine - len(points))",
             "extension_points(study, m, batch, rows, budget - len(points))",
             "edge extensions may use the runs the lr refinement is owed", STUDY_TESTS),
    Mutation("best-baseline-while-seeds-to-come", ANALYSIS,
             "if set(pending.get(str(batch), ())) & set(baselines):",
             "if False:",
             "a study in progress names a best baseline although another baseline's seeds are still to come",
             STUDY_TESTS),
    Mutation("prune-before-the-incumbent-crossing", PLAN,
             "if step >= best and loss > self.target:",
             "if step >= best - 1 and loss > self.target:",
             "a selection run is stopped while it could still cross the target first (the selection could change)",
             ("tests/test_bench.py::test_lr_search_stop_waits_for_an_incumbent_of_its_own_cell",)),
]

# Runs in the test process: gnlm must come from the temporary copy, then pytest runs in the same interpreter.
RUNNER = (
    "import sys, os, gnlm, pytest\n"
    "where = os.path.realpath(gnlm.__file__)\n"
    "if not where.startswith(os.path.realpath(sys.argv[1]) + os.sep):\n"
    "    print(f'gnlm imported from {where}, not from the mutated copy under {sys.argv[1]}', file=sys.stderr)\n"
    "    sys.exit(97)  # not pytest's 1 (tests failed): a wrong import must never count as a caught mutation\n"
    "sys.exit(pytest.main(sys.argv[2:]))\n"
)


def check_snippets(mutations: list[Mutation]) -> list[str]:
    errors = []
    for m in mutations:
        text = (ROOT / m.file).read_text(encoding="utf-8")
        count = text.count(m.original)
        if count != 1:
            errors.append(f"{m.name}: the snippet occurs {count} times in {m.file} (expected exactly once); "
                          f"update MUTATIONS in {Path(__file__).name}:\n    {m.original!r}")
        if m.original == m.mutated:
            errors.append(f"{m.name}: the mutated snippet equals the original")
    return errors


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0].split(" ", 1)[1]
    return "?"


def run_tests(mutation: Mutation | None, tests: tuple[str, ...]) -> tuple[int, str, float]:
    """Copy src/, apply the mutation (if any), run ``tests`` against the copy. Returns (pytest rc, output, s)."""
    with tempfile.TemporaryDirectory(prefix="gnlm-mutation-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        if mutation is not None:
            path = Path(tmp) / mutation.file
            text = path.read_text(encoding="utf-8")
            assert text.count(mutation.original) == 1, mutation.name
            path.write_text(text.replace(mutation.original, mutation.mutated), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", RUNNER, str(src), *PYTEST_ARGS, *tests], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=TIMEOUT_S)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = -1, f"timed out after {TIMEOUT_S} s\n{e.stdout or ''}{e.stderr or ''}"
        return rc, out, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="run only the mutations whose name contains this text")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = ap.parse_args()
    mutations = [m for m in MUTATIONS if args.k in m.name]
    if args.list:
        for m in mutations:
            print(f"{m.name:{NAME_WIDTH}s} {m.file:24s} {m.description}")
        return 0
    errors = check_snippets(MUTATIONS)
    if errors:
        print("mutation list out of date:\n" + "\n".join(errors), file=sys.stderr)
        return 2
    total = time.perf_counter()
    suites = list(dict.fromkeys(m.tests for m in mutations))  # each set of test files, in the list's order
    print(f"{len(mutations)} mutations; tests: {'; '.join(' '.join(s) for s in suites)}", flush=True)

    for tests in suites:
        rc, out, secs = run_tests(None, tests)
        if rc != 0:
            print(f"unmutated source: {' '.join(tests)} FAIL (rc {rc}, {secs:.1f} s); fix them before checking "
                  f"mutations\n{out}", file=sys.stderr)
            return 1
        summary = re.findall(r"^\d+ passed.*$", out, re.MULTILINE)
        passed = summary[-1] if summary else ""
        print(f"{'(unmutated)':{NAME_WIDTH}s} pass          {secs:6.1f} s  {passed}", flush=True)

    bad = []
    for m in mutations:
        rc, out, secs = run_tests(m, m.tests)
        if rc == 1:  # some test failed
            status, detail = "caught", first_failure(out)
        elif rc == 0:
            status, detail = "NOT CAUGHT", m.description
            bad.append(m.name)
        else:  # collection error, import error, timeout, wrong gnlm imported: not a meaningful catch
            status, detail = f"BROKEN rc={rc}", (out.strip().splitlines() or ["?"])[-1]
            bad.append(m.name)
        print(f"{m.name:{NAME_WIDTH}s} {status:12s}  {secs:6.1f} s  {detail}", flush=True)
    print(f"total {time.perf_counter() - total:.1f} s", flush=True)
    if bad:
        print(f"{len(bad)} of {len(mutations)} mutations not caught: {', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"all {len(mutations)} mutations caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
