"""The table and figure of `gnlm probe` (``probe.md``, ``probe.png``) from the result dict that
:func:`gnlm.probe.run_probe` writes as ``probe.json``: rendering only, no compute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["LABELS", "markdown", "no_help", "plot"]

LABELS = {"gn": "GN step (CG)", "layerwise": "layerwise GN", "gradient": "gradient"}


def no_help(step: Any, lams: list[float]) -> str:
    return (f"the GN oracle does not lower the real loss (raises it or leaves it) on the fresh batches at any η and "
            f"any λ in "
            f"{{{', '.join(f'{lam:g}' for lam in lams)}}} (checkpoint step {step}): ρ then measures closeness to a "
            "step that does not help; widen --damping-grid or probe another checkpoint")


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def _rows(point: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    rows = [(n, f"{e['lr']:g} ({e['lr_source']})", e) for n, e in point["optimizers"].items()]
    return rows + [(LABELS[r], "—", point["references"][r]) for r in ("layerwise", "gradient", "gn")]


def markdown(result: dict[str, Any]) -> str:
    """The Markdown report of a :func:`run_probe` result (printed by ``gnlm probe`` and written as probe.md)."""
    etas = result["etas"]
    gap = result["gmg_rel_gap_bound"]
    cg = (f"{max(result['cg_iterations'])} iterations (max {result['cg_iters']}), relative residual "
          f"≤ {result['cg_rel_residual']:.1e} (tol {result['cg_tol']:g})"
          + ("" if result["cg_converged"] else " — NOT CONVERGED")
          + (f"; gᵀM⁻¹g, hence every ρ, within {gap:.1%}" if gap is not None else ""))
    lw = (f"{max(result['layerwise_cg_iterations'])} iterations, relative residual "
          f"≤ {result['layerwise_cg_rel_residual']:.1e}" + ("" if result["layerwise_cg_converged"]
                                                           else " — NOT CONVERGED"))
    lines = [
        "## gnlm probe", "",
        (f"Source `{result['source']}` ({result['source_kind']}), checkpoint step {result['step']}, training loss "
         f"{result['loss']:.4f}; batch {result['batch_tokens']:,} tokens, {result['probe_batches']} probe batches, "
         f"{result['warmup_steps']} warm-up steps; the oracle over the whole batch in micro-batches of "
         f"{result['micro_batch_sequences']} sequences."), "",
        (f"Damping λ = {result['damping']:g}, fixed by --damping." if result["damping_fixed"] else
         f"Damping λ* = {result['damping']:g}, calibrated over λ ∈ {{{', '.join(f'{v:g}' for v in result['damping_grid'])}}}: "
         f"the λ whose GN step lowers the real loss most on the fresh batches at its best η. Every ρ and step "
         f"efficiency below is at λ*; ρ at every λ is in the second table."), "",
        *([f"**Warning: {no_help(result['step'], result['damping_grid'])}.**", ""] if not result["oracle_helps"]
          else []),
        f"GN step by CG at λ*: {cg}. Layerwise GN ({result['layerwise_blocks']} blocks): {lw}.", "",
        (f"ρ = (gᵀd)²/(dᵀMd·gᵀM⁻¹g) (1 = the GN direction); step efficiency = −q(d)/Δq* at the step as taken; "
         f"best scale = the GN model's best multiple of the step; GN-model Δ = q(d), the change the model predicts "
         f"for the step; real Δloss = the change on fresh batches at η = 1 and at the best "
         f"η ∈ {{{', '.join(f'{e:.3g}' for e in etas)}}} (η scales the step); real / oracle = the best real "
         f"decrease over the GN oracle's at λ* (the second measure; 1 = as good as the oracle on the real loss)."),
        "",
        "| direction | lr | ρ | step efficiency | best scale | GN-model Δ | real Δloss (η=1) | best real Δloss (η) "
        "| real / oracle |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, lr, e in _rows(result):
        curve = e["real_loss_change"]
        frac = e["real_loss_fraction"]
        lines.append(f"| {label} | {lr} | {_pm(e['rho'], e['rho_std'])} | "
                     f"{_pm(e['step_efficiency'], e['step_efficiency_std'])} | {e['best_scale']:.3g} | "
                     f"{e['predicted_loss_change'][0]:+.4f} | {curve[0]:+.4f} | {e['best_real_loss_change']:+.4f} "
                     f"({e['best_eta']:.3g}) | {'—' if frac is None else f'{frac:.3f}'} |")
    opts = list(result["optimizers"])
    if len(result["by_damping"]) > 1:
        lines += ["", "ρ against the damping (mean over probe batches; λ* in bold):", "",
                  "| λ | oracle's best real Δloss (η) | " + " | ".join([*opts, "layerwise GN", "gradient"]) + " |",
                  "|---" * (len(opts) + 4) + "|"]
        for d in result["by_damping"]:
            lam = f"**{d['damping']:g}**" if d["damping"] == result["damping"] else f"{d['damping']:g}"
            rhos = [d["rho"][n] for n in [*opts, "layerwise", "gradient"]]
            lines.append(f"| {lam} | {d['oracle_best_real_loss_change']:+.4f} ({d['oracle_best_eta']:.3g}) | "
                         + " | ".join(f"{r:.3f}" for r in rhos) + " |")
    skipped = sorted(set(result.get("damping_grid", [])) - {d["damping"] for d in result["by_damping"]})
    if skipped:
        lines += ["", f"Not solved: λ = {', '.join(f'{v:g}' for v in skipped)} (the sweep stopped at the first λ "
                  "whose GN step did worse on the real loss than a larger one; --full-sweep solves every λ)."]
    lines += ["", "Optimizer settings (as built: each param group's constructor values; probe.json `settings` has "
              "every option):", ""]
    for name, e in result["optimizers"].items():
        st = e["settings"]
        groups = "; ".join(", ".join(f"{k} {v}" for k, v in g.items()) for g in st["param_groups"])
        sched = st["schedule"]
        lines.append(f"- {name}: {st['source']}. Clip {st['optim']['clip']:g}"
                     f"{' per group' if st['optim']['clip_per_group'] else ''}; schedule {sched['name']} "
                     f"(warm-up {sched['warmup_steps']}) over {st['train_steps']} steps, probe step = update "
                     f"{st['probe_update']} at lr {st['lr_at_probe_step']:.3g}; state: {st['state']}. "
                     + (f"optim.kwargs {st['optim']['kwargs']}. " if st["optim"]["kwargs"] else "")
                     + f"Groups: {groups}.")
    if "along" in result:
        lines += ["", "ρ along the run (each checkpoint at its own λ*):", "",
                  "| step | λ* | " + " | ".join([*opts, "layerwise GN", "gradient", "GN (CG)"]) + " |",
                  "|---" * (len(opts) + 5) + "|"]
        for p in result["along"]:
            cells = [p["optimizers"][n]["rho"] for n in opts] + [p["layerwise_rho"], p["gradient_rho"], p["gn_rho"]]
            lines.append(f"| {p['step']} | {p['damping']:g} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lam) = plt.subplots(1, 2, figsize=(12.4, 4.6))
    opts = list(result["optimizers"])
    points = result.get("along", [result])
    values = [v for p in points for v in [*(p["optimizers"][n]["rho"] for n in opts), p["gradient_rho"]]]
    if "along" in result:
        steps = [p["step"] if p["step"] is not None else i for i, p in enumerate(points)]
        for i, n in enumerate(opts):
            ax.plot(steps, [p["optimizers"][n]["rho"] for p in points], "o-", color=f"C{i}", label=n)
        for ref, style in (("layerwise", "--"), ("gradient", ":")):
            ax.plot(steps, [p[f"{ref}_rho"] for p in points], style, color="k", marker=".", label=LABELS[ref])
        ax.set_xlabel("training step of the checkpoint")
        ax.set_title("Direction efficiency ρ along the run (1 = GN direction)")
    else:
        rho = [result["optimizers"][n]["rho"] for n in opts]
        std = [result["optimizers"][n]["rho_std"] for n in opts]
        ax.bar(opts, rho, yerr=std, capsize=4, color=[f"C{i}" for i in range(len(opts))])
        for ref, style in (("gn", "-"), ("layerwise", "--"), ("gradient", ":")):
            ax.axhline(result[f"{ref}_rho"], color="k", ls=style, label=f"{LABELS[ref]} ({result[f'{ref}_rho']:.3f})")
        ax.set_title(f"Direction efficiency ρ at step {result['step']} (1 = GN direction; "
                     f"batch {result['batch_tokens']:,} tokens)", fontsize=10)
    if all(v > 0 for v in values):
        ax.set_yscale("log")  # the optimizers and the gradient sit orders of magnitude below the oracle
    else:
        ax.set_ylim(bottom=0)
    ax.set_ylabel("ρ (mean over probe batches)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    lams = [d["damping"] for d in result["by_damping"]]
    for i, n in enumerate(opts):
        ax_lam.plot(lams, [d["rho"][n] for d in result["by_damping"]], "o-", color=f"C{i}", label=n)
    for ref, style in (("layerwise", "--"), ("gradient", ":")):
        ax_lam.plot(lams, [d["rho"][ref] for d in result["by_damping"]], style, color="k", marker=".",
                    label=LABELS[ref])
    ax_lam.axvline(result["damping"], color="C3", lw=1, label=f"λ* = {result['damping']:g}")
    if all(v > 0 for v in lams):
        ax_lam.set_xscale("log")
    ax_lam.set_xlabel("damping λ")
    ax_lam.set_ylabel("ρ at λ (mean over probe batches)")
    ax_lam.set_ylim(0, 1.02)
    ax_lam.set_title(f"ρ against the damping at step {result['step']}" + ("" if result["oracle_helps"] else
                     " (the oracle raises the real loss at every λ)"), fontsize=10)
    ax_lam.grid(True, which="both", alpha=0.3)
    ax_lam.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
