"""`python -m training card --model <version>`: the model card as Markdown, from model.json."""

from __future__ import annotations

import json
from pathlib import Path

ROWS = ("n", "auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "ece")


def metrics_table(columns: dict[str, dict]) -> str:
    head = "| metric | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    body = ""
    for row in ROWS:
        cells = [str(report.get(row, "–")) for report in columns.values()]
        body += f"| {row} | " + " | ".join(cells) + " |\n"
    return head + body


def robustness_table(report: dict) -> str:
    out = "| perturbation | AUC | accuracy | sensitivity | specificity |\n|---|---|---|---|---|\n"
    for name, values in report.items():
        out += (
            f"| {name} | {values['auc']} | {values['accuracy']} | {values['sensitivity']} | "
            f"{values['specificity']} |\n"
        )
    return out


def render(version_dir: Path) -> str:
    card = json.loads((version_dir / "model.json").read_text())
    metrics = card["metrics"]
    training = card["training"]
    columns = {
        "validation": metrics["validation"],
        "internal test (threshold)": metrics["internal_test"],
        "internal test (0.5)": metrics["internal_test_at_0.5"],
    }
    if training.get("swa_epochs"):
        kept = f"weights averaged over the last {training['swa_epochs']} epochs"
        if training.get("swa_lr"):
            kept += f" at a constant learning rate {training['swa_lr']:g}"
    else:
        kept = f"best {training.get('best_epoch')}"
    if card["architecture"] == "ensemble":
        members = card["members"]
        trained = (
            f"the average of {len(members)} versions' calibrated logits ("
            + "; ".join(
                f"{m['path']}: `{m['architecture']}`, {m['training'].get('epochs_run')} epochs in "
                f"{m['training'].get('fit_seconds', 0) / 60:.1f} min"
                for m in members
            )
            + f"; {training['fit_seconds'] / 60:.1f} min of fitting together) on "
            f"{training['host']}"
        )
    else:
        trained = (
            f"trained {training['epochs_run']} epochs ({kept}) in"
            f" {training['fit_seconds'] / 60:.1f} min on {training['host']}"
        )
    lines = [
        f"**{card['name']} v{card['version']}** — `{card['architecture']}`, "
        f"{card['parameters']:,} parameters, {card['flops_per_image'] / 1e6:.0f} MFLOPs/image; "
        f"threshold {card['threshold']:.4f} ({card['threshold_rule']}); temperature "
        f"{card['temperature']:.3f}; {trained}; data manifest "
        f"{card['data']['manifest_sha256'][:12]}; split "
        f"{card['data']['counts']}.",
        "",
        metrics_table(columns),
        f"ECE before calibration: {metrics['ece_before_calibration']}.",
    ]
    if "robustness_internal_test" in metrics:
        lines += [
            "",
            "Internal test under fixed acquisition perturbations (same threshold):",
            "",
            robustness_table(metrics["robustness_internal_test"]),
        ]
    if "derived_from" in card:
        source = card["derived_from"]
        lines += ["", f"Republished from version {source['version']}: {source['change']}."]
        while isinstance(source.get("previous"), dict):
            source = source["previous"]
            lines.append(f"That one from version {source['version']}: {source['change']}.")
    if card.get("tflite", {}).get("file"):
        worst = card["tflite"]["max_difference_on_probe"]
        shown = ", ".join(f"{name} {value:.1e}" for name, value in worst.items())
        lines += [
            "",
            f"Runtimes: the SavedModel and `{card['tflite']['file']}` "
            f"({card['tflite']['runtime']}), which the service runs; largest difference on the "
            f"{card['tflite']['probe_images']}-image probe batch: {shown}.",
        ]
    low, high = card.get("population", {}).get("age_years", (1, 5))
    lines += [
        "",
        f"Population: patients aged {low}-{high} (completed years)"
        + (
            ""
            if "population" in card
            else ", the shared data's cohort (this card predates the field)"
        )
        + "; the service flags DICOMs of patients outside these ages (`age_check`).",
    ]
    if "ood" in card:
        section = card["ood"]
        rates = section["flag_rates"]
        synthetic = ", ".join(f"{k} {v:.0%}" for k, v in rates["synthetic_mistakes"].items())
        lines += [
            "",
            f"Out-of-distribution flag: `{section['output']}` above {section['threshold']} "
            f"({section['threshold_rule']}). Flagged: validation {rates['validation']:.1%}, "
            f"internal test {rates['internal_test']:.1%}, perturbed validation at most "
            f"{max(rates['perturbed_validation'].values()):.1%}; synthetic mistakes: "
            f"{synthetic}.",
        ]
    return "\n".join(lines)


def main_card(args) -> int:
    print(render(Path(args.model)))
    return 0
