"""``<experiment>/report.html``: the leaderboard as one self-contained page (plots inline as PNG).

It reads what the leaderboard step saved (rows, per-row details, val/test probabilities), each kept
trial's Tune results and the Optuna study. It runs no search and selects nothing. Grad-CAM reads the
test images the leaderboard already scored. Plots are matplotlib, drawn on ``Figure`` objects (no
pyplot state), except Optuna's, which bring their own pyplot figures and are closed after use.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import warnings
from functools import partial
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pneumo_ray import credentials, storage
from pneumo_ray.checkpoints import load_ranked
from pneumo_ray.config import Config
from pneumo_ray.data import CLASS_NAMES, Splits
from pneumo_ray.layout import (
    EVALUATION_FILE,
    LEADERBOARD_JSON,
    MODEL_CARD_FILE,
    OPTUNA_FILE,
    PREDICTIONS_FILE,
    REPORT_FILE,
    TRIAL_RESULT_FILE,
    default_study_url,
)
from pneumo_ray.leaderboard import (
    ENSEMBLE,
    HALF,
    comparison_sentence,
    configs_table,
    describe,
    is_ensemble,
    label_of,
    results_table,
    transfer_sentence,
    trial_rows,
)
from pneumo_ray.repeats import runs_table

MEDMNIST_CITATION = ("Data: PneumoniaMNIST from MedMNIST v2 (CC BY 4.0). Yang, J. et al. MedMNIST v2 - A large-scale "
                     "lightweight benchmark for 2D and 3D biomedical image classification. Scientific Data 10, 41 (2023).")
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f2f2f2}td:nth-child(2){text-align:left}tr.ensemble{background:#eef6ff}
img{max-width:100%;display:block;margin:.5em 0 1.5em}.note{color:#555;font-size:13px}h2{margin-top:1.6em}
.verdict{font-weight:600}"""


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def img(fig, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png(fig)}">'


def table(header: list[str], body: list[list], row_class: list[str] | None = None) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    lines = [f"<tr>{cells}</tr>"]
    for i, r in enumerate(body):
        cls = f' class="{row_class[i]}"' if row_class and row_class[i] else ""
        lines.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    return "<table>" + "".join(lines) + "</table>"


# --------------------------------------------------------------------------- sections


def leaderboard_section(rows: list[dict], metric: str, settings: dict) -> str:
    header, body = results_table(rows)
    return ("<h2>Test leaderboard</h2>" + f'<p class="note">{html.escape(describe(settings))} Ranked by {metric}; the '
            "ensemble averages the ranked models' probabilities and gets its own threshold on val.</p>"
            + table(header, body, [ENSEMBLE if is_ensemble(r) else "" for r in rows])
            + "".join(f'<p class="verdict">{html.escape(sentence)}</p>'
                      for sentence in (comparison_sentence(rows), transfer_sentence(rows[0])) if sentence)
            + "<h3>Configurations</h3>" + table(*configs_table(rows))
            + ("<h3>Over each configuration's runs (leaderboard.repeats)</h3><p class='note'>Its own run and its "
               "repeats with new seeds, each at its own threshold chosen on val; ranked on the mean val metric.</p>"
               + table(*runs) if (runs := runs_table(rows, metric)) else ""))


def curves_section(rows: list[dict], preds) -> str:
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    roc, pr = fig.subplots(1, 2)
    y = preds["test_y"]
    for r in rows:
        p = preds[f"test_{r['row']}"]
        RocCurveDisplay.from_predictions(y, p, ax=roc, name=label_of(r))
        PrecisionRecallDisplay.from_predictions(y, p, ax=pr, name=label_of(r))
        if is_ensemble(r):  # black, so it stands apart from its members
            for ax in (roc, pr):
                ax.lines[-1].set_color("black")
        # The operating point at the tuned threshold, where the leaderboard's numbers come from.
        roc.plot(1 - r["test_specificity"], r["test_sensitivity"], "o", color=roc.lines[-1].get_color(), ms=7, mec="white")
    roc.plot([0, 1], [0, 1], ":", color="grey")
    roc.legend(fontsize=8, loc="lower right")  # again: the ensemble's colour changed after sklearn drew its legend
    pr.legend(fontsize=8, loc="lower left")
    roc.set_title("ROC (dots: tuned threshold)")
    pr.set_title("Precision-recall (pneumonia = positive)")
    return "<h2>ROC and precision-recall curves (test)</h2>" + img(fig, "ROC and PR curves")


def confusion_section(rows: list[dict], details: dict) -> str:
    from sklearn.metrics import ConfusionMatrixDisplay

    shown = [rows[0]] + [r for r in rows if is_ensemble(r)]
    fig = Figure(figsize=(4.4 * 2, 3.8 * len(shown)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(shown), 2))
    for r, pair in zip(shown, axes):
        d = details[r["row"]]
        for ax, (key, title) in zip(pair, (("tuned", f"threshold {r['threshold']:.3f} (tuned on val)"),
                                           (HALF, "threshold 0.5"))):
            ConfusionMatrixDisplay(np.array(d["confusion"][key]), display_labels=list(CLASS_NAMES)).plot(
                ax=ax, colorbar=False, cmap="Blues", values_format="d")
            ax.set_title(f"{label_of(r)}: {title}", fontsize=10)
    per_class = []
    for r in rows:
        for key in ("tuned", HALF):
            report = details[r["row"]]["per_class"][key]
            for name in CLASS_NAMES:
                c = report[name]
                per_class.append([label_of(r), "tuned" if key == "tuned" else "0.5", name, f"{c['precision']:.3f}",
                                  f"{c['recall']:.3f}", f"{c['f1-score']:.3f}", int(c["support"])])
    return ("<h2>Confusion matrices and per-class report (test)</h2>" + img(fig, "confusion matrices")
            + table(["row", "threshold", "class", "precision", "recall", "F1", "images"], per_class))


def calibration_section(rows: list[dict], preds, settings: dict) -> str:
    from sklearn.calibration import CalibrationDisplay

    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    for r in rows:
        CalibrationDisplay.from_predictions(preds["test_y"], preds[f"test_{r['row']}"], n_bins=10, ax=ax,
                                            name=f"{label_of(r)} (ECE {r['test_ece']:.3f})")
        if is_ensemble(r):
            ax.lines[-1].set_color("black")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Reliability diagram (test, 10 bins)")
    note = ("Probabilities were temperature-scaled on val." if settings.get("temperature_scaling") else
            "Uncalibrated probabilities; set leaderboard.temperature_scaling: true to fit a temperature on val.")
    return f'<h2>Calibration</h2><p class="note">{note}</p>' + img(fig, "reliability diagram")


def training_section(exp_dir: Path, rows: list[dict], metric: str) -> str:
    logdirs = {t["trial_id"]: t["relative_logdir"] for t in storage.saved_trials(exp_dir)}
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for r in rows:
        result = exp_dir / logdirs.get(r["trial_id"], "-") / TRIAL_RESULT_FILE
        if is_ensemble(r) or not result.is_file():
            continue
        epochs = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        x = [e["epoch"] for e in epochs]
        line, = left.plot(x, [e.get(metric) for e in epochs], marker="o", ms=3, label=label_of(r))
        right.plot(x, [e.get("train_loss") for e in epochs], color=line.get_color(), label=f"{label_of(r)} train")
        right.plot(x, [e.get("val_loss") for e in epochs], "--", color=line.get_color(), label=f"{label_of(r)} val")
    if not left.lines:
        return '<h2>Training curves</h2><p class="note">No Tune results found for the ranked trials.</p>'
    left.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
    right.set(xlabel="epoch", ylabel="loss", title="loss per epoch (solid: train, dashed: val)")
    for ax in (left, right):
        ax.legend(fontsize=8)
    return "<h2>Training curves of the ranked trials</h2>" + img(fig, "training curves")


def search_section(cfg: Config, exp_dir: Path, seed: int) -> str:
    import matplotlib.pyplot as plt
    import optuna

    out = ["<h2>Search (Optuna)</h2>"]
    if not cfg.search.optuna_storage and not (exp_dir / OPTUNA_FILE).is_file():  # opening would create an empty one
        return out[0] + f'<p class="note">No {OPTUNA_FILE} in the experiment: no search plots.</p>'
    try:
        url = credentials.expand(cfg.search.optuna_storage or default_study_url(str(exp_dir)), "search.optuna_storage")
        study = optuna.load_study(study_name=cfg.experiment.name, storage=url)
    except Exception as err:  # a server that is gone, a study deleted: the rest of the report still stands
        return out[0] + f'<p class="note">Study not readable ({html.escape(type(err).__name__)}): no search plots.</p>'
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    importances = optuna.importance.FanovaImportanceEvaluator(seed=seed)  # seeded: the same report every time
    for plot, title in ((optuna.visualization.matplotlib.plot_optimization_history, "optimization history"),
                        (partial(optuna.visualization.matplotlib.plot_param_importances, evaluator=importances),
                         "parameter importances")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as err:  # e.g. importances need 2+ finished trials
                out.append(f'<p class="note">No {title}: {html.escape(str(err)[:200])}</p>')
                continue
        fig = ax.figure
        fig.set_size_inches(7.5, 4)
        out.append(img(fig, title))
        plt.close(fig)
    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    out.insert(1, f'<p class="note">{len(study.trials)} trials, {done} complete. Early-stopped (ASHA) trials count as '
                  "complete with their last epoch's value.</p>")
    return "".join(out)


def gradcam_section(exp_dir: Path, rows: list[dict], preds, splits: Splits, count: int, seed: int) -> str:
    from pneumo_ray.augment import resized_splits
    from pneumo_ray.explain import cam_layer, grad_cam, overlay

    out = ["<h2>Grad-CAM (test images)</h2>"]
    for r in trial_rows(rows):  # the best-ranked model that has a feature map to explain
        members = load_ranked(exp_dir, r)  # one model, or a cross-validated trial's fold-models
        if cam_layer(members[0][0], members[0][1]["image_size"]) is not None:
            break
    else:
        return out[0] + '<p class="note">No ranked model has a convolutional feature map (e.g. mlp): no Grad-CAM.</p>'

    y, prob = splits.test_y, preds[f"test_{r['row']}"]
    test_x = resized_splits(splits, members[0][1]["image_size"]).test_x  # as the model saw them (models.<label>.size)
    pred = (prob >= r["threshold"]).astype(int)
    rng = np.random.default_rng(seed)
    sample = np.concatenate([rng.choice(np.flatnonzero(y == c), size=min(count // 2 + c * (count % 2),
                                                                          int((y == c).sum())), replace=False)
                             for c in (0, 1)])
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-np.abs(prob[wrong] - r["threshold"]))][:count]  # the most confident mistakes first
    out.append(f'<p class="note">Model {html.escape(label_of(r))} (trial {r["trial_id"]}), heatmaps for the pneumonia '
               f'class; labels at its tuned threshold {r["threshold"]:.3f}. {len(np.flatnonzero(pred != y))} of '
               f"{len(y)} test images are misclassified.</p>")
    for title, idx in ((f"A fixed sample (seed {seed})", sample), ("Misclassified, most confident first", wrong)):
        if len(idx) == 0:
            out.append(f"<h3>{title}</h3><p class='note'>none</p>")
            continue
        heat = np.mean([grad_cam(model, test_x[idx], meta["mean"], meta["std"], meta["normalize"])
                        for model, meta in members], axis=0)
        cols = min(len(idx), 8)
        fig = Figure(figsize=(1.7 * cols, 2.1 * ((len(idx) + cols - 1) // cols)), layout="constrained")
        axes = np.atleast_1d(fig.subplots((len(idx) + cols - 1) // cols, cols)).ravel()
        for ax, i, h in zip(axes, idx, heat):
            ax.imshow(overlay(test_x[i], h, side=112))
            ax.set_title(f"true {CLASS_NAMES[y[i]]}\np={prob[i]:.2f} -> {CLASS_NAMES[pred[i]]}", fontsize=8,
                         color="black" if pred[i] == y[i] else "firebrick")
        for ax in axes:
            ax.axis("off")
        out.append(f"<h3>{title}</h3>" + img(fig, f"Grad-CAM: {title}"))
    return "".join(out)


def model_card_section(exp_dir: Path) -> str:
    """MODEL_CARD.md as HTML, its headings one level down: intended use, data, metrics, limitations, manifest."""
    import markdown

    if not (exp_dir / MODEL_CARD_FILE).is_file():
        return f'<h2>Model card</h2><p class="note">No {MODEL_CARD_FILE} in the experiment.</p>'
    card = (exp_dir / MODEL_CARD_FILE).read_text().replace("\n## ", "\n### ").replace("# Model card", "## Model card", 1)
    return markdown.markdown(html.escape(card, quote=False), extensions=["tables"])


# --------------------------------------------------------------------------- page


def write_report(exp_dir: Path, cfg: Config, splits: Splits) -> Path:
    rows = json.loads((exp_dir / LEADERBOARD_JSON).read_text())
    path = exp_dir / REPORT_FILE
    title = f"pneumo-ray report: {cfg.experiment.name}"
    head = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>")
    intro = (f'<p class="note">Data: {html.escape(splits.summary())}. Written '
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. The test split was read once, after the "
             "search; thresholds and temperatures were chosen on val.</p>")
    evaluation = json.loads((exp_dir / EVALUATION_FILE).read_text())
    settings, details, metric = evaluation["settings"], evaluation["rows"], evaluation["settings"]["selection_metric"]
    with np.load(exp_dir / PREDICTIONS_FILE) as saved:
        preds = {k: saved[k] for k in saved.files}
    sections = [leaderboard_section(rows, metric, settings), curves_section(rows, preds),
                confusion_section(rows, details), calibration_section(rows, preds, settings),
                training_section(exp_dir, rows, metric), search_section(cfg, exp_dir, cfg.experiment.seed)]
    if cfg.leaderboard.gradcam_images:
        sections.append(gradcam_section(exp_dir, rows, preds, splits, cfg.leaderboard.gradcam_images,
                                        cfg.experiment.seed))
    sections.append(model_card_section(exp_dir))
    cite = f'<p class="note">{MEDMNIST_CITATION}</p>' if cfg.data.source in ("medmnist", "npz") else ""
    path.write_text(head + intro + "".join(sections) + cite + "</body></html>")
    return path
