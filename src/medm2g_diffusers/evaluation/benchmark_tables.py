"""Markdown tables, shaped like the paper's, from the results dict of :func:`~.benchmark.run_benchmark`."""

from __future__ import annotations

from typing import Any

import numpy as np


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _methods(results: dict, entry: dict) -> list[str]:
    """The pipelines scored in ``entry``: the model first, then the baselines, in the run's order."""
    return [name for name in [results["model"], *results["baselines"]] if name in entry]


def _cannot(results: dict, entries: dict) -> list[str]:
    """Footnotes: which pipeline could not do which task, and why (from the entries' ``skipped``)."""
    lines = [f"- {name} on {task}: {reason}" for task, entry in entries.items() for name, reason in entry.get("skipped", {}).items()]
    return ["", "Not scored:", *lines] if lines else []


def _held_out(results: dict) -> str:
    return f"{results.get('split', 'test')} split"


def report_table(results: dict) -> list[str]:
    r = results["report_generation"]
    names = [*_methods(results, r), *(["nearest_neighbour"] if "nearest_neighbour" in r else [])]
    findings = any("finding" in r[name] for name in names)
    where = "held-out chest patients" if findings else f"rows of the {_held_out(results)}"
    lines = [f"### Report generation (X-ray -> report, {r['n']} {where})", "",
             "| method | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L |" + (" finding F1 (micro) | finding F1 (macro) | exact findings |" if findings else ""),
             "| --- | --- | --- | --- | --- | --- |" + (" --- | --- | --- |" if findings else "")]
    for name in names:
        m = r[name]
        label = f"nearest-neighbour retrieval (pixels, {m['pool']} {m.get('pool_split', 'train')} X-rays)" if name == "nearest_neighbour" else name
        line = f"| {label} | " + " | ".join(_f(m[f"bleu_{n}"]) for n in range(1, 5)) + f" | {_f(m['rouge_l'])} |"
        if findings:
            line += f" {_f(m['finding']['micro_f1'])} | {_f(m['finding']['macro_f1'])} | {_f(m['finding']['exact_match'])} |"
        lines.append(line)
    protocol = next((r[name]["protocol"] for name in names), "")
    note = (f" The labeller scores {_f(r['labeller_on_references']['micro_f1'])} micro F1 on the reference reports themselves."
            if "labeller_on_references" in r else " References: the dataset's reports (no ground-truth findings: no finding F1).")
    lines += ["", f"Protocol: {protocol.rstrip('.')}.{note}"]
    # Runs before report candidates existed record none: one sampled report each, and the page says nothing.
    counts = {name: r[name]["report_candidates"] for name in names if "report_candidates" in r[name]}
    if counts:
        groups = {n: [name for name, m in counts.items() if m == n] for n in sorted(set(counts.values()), reverse=True)}
        lines += ["", "Sampling: " + "; ".join(
            f"{', '.join(group)}: " + (f"the consensus of {n} sampled reports per X-ray (minimum Bayes risk: the candidate closest "
                                       "on average to the others in the text prompt encoder's space; `report_candidates`)"
                                       if n > 1 else "one sampled report per X-ray")
            for n, group in groups.items()) + "."]
    return lines + _cannot(results, {"report generation": r}) + [""]


def text_to_image_table(results: dict) -> list[str]:
    entries = results["text_to_image"]
    findings = any("classifier_on_real" in entry for entry in entries.values())
    title = ("held-out reports; finding accuracy by classifiers trained on real phantoms only" if findings
             else f"reports of the {_held_out(results)}; no ground-truth findings: no finding accuracy")
    # Runs before the VAE-ceiling column existed have no "classifier_on_vae_ceiling": their tables keep the old columns.
    vae_owner = next((e["classifier_on_vae_ceiling"]["model"] for e in entries.values() if "classifier_on_vae_ceiling" in e), None)
    ceiling = [f"classifier on real through {vae_owner}'s VAE (ceiling)"] if findings and vae_owner else []
    columns = ["finding exact-set accuracy", "finding macro F1", "classifier on real: exact / macro F1"] if findings else []
    columns += ceiling
    lines = [f"### Text -> image ({title})", "",
             "| modality | method | n | FID ↓ | MS-SSIM diversity ↓ |" + "".join(f" {c} |" for c in columns),
             "| --- | --- | --- | --- | --- |" + " --- |" * len(columns)]
    pair = lambda m: f"{_f(m['exact_set_accuracy'])} / {_f(m['macro_f1'])}"  # noqa: E731
    for target, entry in entries.items():
        for name in _methods(results, entry):
            m = entry[name]
            line = f"| {target} | {name} | {entry['n']} | {_f(m['fid']['fid'] if 'fid' in m else None, 1)} | {_f(m['ms_ssim_diversity']['ms_ssim'])} |"
            if findings:
                line += f" {_f(m['finding']['exact_set_accuracy'])} | {_f(m['finding']['macro_f1'])} | {pair(entry['classifier_on_real'])} |"
            if ceiling:
                line += f" {pair(entry['classifier_on_vae_ceiling']) if 'classifier_on_vae_ceiling' in entry else '–'} |"
            lines.append(line)
    scored = [entry[name] for entry in entries.values() for name in _methods(results, entry)]
    fid = next((m["fid"] for m in scored if "fid" in m), None)
    if fid is not None:
        lines += ["", f"FID: {fid.get('protocol', '')}" + (f". {fid['note']}" if "note" in fid else "")]
    diversity = next((m["ms_ssim_diversity"] for m in scored), None)
    if diversity is not None:
        lines += ["", f"Diversity: {diversity.get('protocol', '')}"]
    if ceiling:
        lines += ["", (f"Ceiling: the classifier on the same real images after {vae_owner}'s image VAE, decode(encode(x)) with the "
                       "posterior mean: what a denoiser that recovered each target's own latent exactly would score. A finding lost "
                       "there is one a latent model on that VAE is unlikely to be scored as drawing.")]
    return lines + _cannot(results, entries) + [""]


def image_to_image_table(results: dict) -> list[str]:
    names = [results["model"], *results["baselines"]]
    where = "held-out patients" if results.get("findings", True) else f"rows of the {_held_out(results)}"
    entries = results["image_to_image"]
    # Runs before the ceiling column existed have no "vae_ceiling": their tables keep the old columns.
    vae_owner = next((e["vae_ceiling"]["model"] for e in entries.values() if "vae_ceiling" in e), None)
    extra = [] if vae_owner is None else [f"target through {vae_owner}'s VAE (ceiling)"]
    lines = [f"### Image -> image (PSNR dB / SSIM on {where})", "",
             "| task | n | " + " | ".join(names + ["copy the source"] + extra) + " |",
             "| --- | --- | " + " | ".join("---" for _ in names + ["copy the source"] + extra) + " |"]
    protocol = ""
    score = lambda m: f"{_f(m['psnr_mean'], 2)} / {_f(m['ssim_mean'])}"  # noqa: E731
    for task, entry in entries.items():
        cells = [score(entry[n]) if n in entry else "cannot" for n in names] + [score(entry["copy_source"])]
        if extra:
            cells.append(score(entry["vae_ceiling"]) if "vae_ceiling" in entry else "–")
        lines.append(f"| {task} | {entry['n']} | " + " | ".join(cells) + " |")
        protocol = entry["protocol"]
    one_pass = [n for n, p in results.get("pipelines", {}).items() if p["class"] == "MedM2GRegressionPipeline"]
    note = f" {', '.join(one_pass)}: one forward pass (no sampling steps, no guidance)." if one_pass else ""
    if extra:
        note += (f" Ceiling: the target images through {vae_owner}'s image VAE, decode(encode(x)) with the posterior mean: what"
                 " a denoiser that recovered the target's own latent exactly would score (not a strict bound, since another"
                 " latent could decode closer, but the one a latent model is trained towards).")
    return lines + ["", f"Protocol: {protocol}.{note}"] + _cannot(results, entries) + [""]


def paired_difference(a, b) -> tuple[float, float]:
    """Mean of ``a - b`` over the same images and its standard error (NaN for a single image)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def paired_reading(mean: float, se: float, name: str) -> str:
    """``"within 2 SE"``, or whether ``name`` (the model whose scores came first) is better or worse."""
    if not abs(mean) > 2 * se:  # a NaN standard error reads as "within": one image decides nothing
        return "within 2 SE"
    return f"{name} better" if mean > 0 else f"{name} worse"


def paired_table(results: dict, model: str | None = None, label: str | None = None,
                 against: list[str] | None = None) -> list[str]:
    """Per image -> image task, ``model`` (default: the run's model) minus every other pipeline scored on the same
    images (or only those named in ``against``): PSNR and SSIM, mean ± standard error, and the reading at 2 SE."""
    model = model or results["model"]
    label = label or model
    lines = []
    for task, entry in results.get("image_to_image", {}).items():
        if model not in entry:
            continue
        others = [name for name in [results["model"], *results["baselines"]]
                  if name in entry and name != model and (against is None or name in against)]
        if not others:
            continue
        lines += [f"Paired on the same {entry['n']} images ({task}): {label} minus each model, mean ± standard error.", "",
                  f"| {label} minus | PSNR dB | SSIM | reading (PSNR / SSIM) |", "| --- | --- | --- | --- |"]
        for name in others:
            p = paired_difference(entry[model]["psnr"], entry[name]["psnr"])
            s = paired_difference(entry[model]["ssim"], entry[name]["ssim"])
            lines.append(f"| {name} | {p[0]:+.2f} ± {p[1]:.2f} | {s[0]:+.3f} ± {s[1]:.3f} | "
                         f"{paired_reading(*p, label)} / {paired_reading(*s, label)} |")
        lines.append("")
    return lines


def joint_table(results: dict) -> list[str]:
    lines = ["### Joint generation (one report -> several modalities in one loop): finding agreement between modalities", "",
             "| anatomy | pair | types both classifiers see | patients with one of them | real images (ceiling) | " + " | ".join(
                 f"{n} joint | {n} uncoupled" for n in [results["model"], *results["baselines"]]) + " |",
             "| --- | --- | --- | --- | --- | " + " | ".join("--- | ---" for _ in [results["model"], *results["baselines"]]) + " |"]
    for anatomy, entry in results["joint"].items():
        for pair, info in entry["pairs"].items():
            cells = []
            for name in [results["model"], *results["baselines"]]:
                for label in ("joint", "uncoupled"):
                    value = entry.get(f"{name}/{label}", {}).get("agreement", {}).get(pair)
                    cells.append(_f(value))
            lines.append(f"| {anatomy} (n={entry['n']}) | {pair} | {', '.join(info['types']) or 'none'} | "
                         f"{_f(info.get('with_findings'))} | {_f(entry['real'][pair])} | " + " | ".join(cells) + " |")
    lines += ["", "Agreement: the fraction of patients whose two generated images get the same findings from the "
              "per-modality classifiers, over the finding types both classifiers detect on real test images "
              "(F1 >= 0.5). Two images that both show none of them agree, so read agreement beside the share of "
              "patients whose report has one of them. Uncoupled: the same targets and seeds with `cross_guidance_scale=0`.", ""]
    return lines


def augmentation_table(results: dict) -> list[str]:
    a = results["augmentation"]
    lines = [f"### Data augmentation ({a['modality']} finding classifier, {a['steps']} steps, scored on {a['n_test']} real test images)", "",
             "| training set | exact-set accuracy | macro F1 |", "| --- | --- | --- |"]
    for label, title in (("real", f"{a['n_real']} real"), ("real+generated", f"{a['n_real']} real + {a['n_generated']} generated")):
        lines.append(f"| {title} | {_f(a[label]['exact_set_accuracy'])} | {_f(a[label]['macro_f1'])} |")
    return lines + [""]


def classifier_table(results: dict) -> list[str]:
    lines = ["### The finding classifiers on real held-out images", "",
             "| modality | n | exact-set accuracy | macro F1 | per-type F1 |", "| --- | --- | --- | --- | --- |"]
    for key, entry in results["finding_classifiers"].items():
        m = entry["on_real_test"]
        per_type = ", ".join(f"{t} {_f(v['f1'], 2)}" for t, v in m["per_type"].items() if v["support"])
        lines.append(f"| {key} | {m['n']} | {_f(m['exact_set_accuracy'])} | {_f(m['macro_f1'])} | {per_type} |")
    return lines + [""]


def skipped_list(results: dict) -> list[str]:
    return ["### Not run", "", *(f"- {name}: {reason}" for name, reason in results["skipped"].items()), ""]


def guidance_text(guidance_scale) -> str:
    """The guidance of a run as the tables state it: one scale, or the pipeline's per-target defaults."""
    if guidance_scale is not None:
        return f"{guidance_scale}"
    from ..pipelines.pipeline_medm2g import DEFAULT_GUIDANCE_SCALES

    return f"{DEFAULT_GUIDANCE_SCALES['image']} for images and {DEFAULT_GUIDANCE_SCALES['text']} for reports"


def markdown_tables(results: dict) -> str:
    """All tables of a benchmark run, with the data and machine they came from, and what was not run and why."""
    head = [f"Model `{results['model']}`; baselines: {', '.join(results['baselines']) or 'none'}; data: {results['data']}; "
            f"{results['config']['num_inference_steps']} DDIM steps, guidance {guidance_text(results['config'].get('guidance_scale'))}; "
            f"{results['machine']['processor']}, {results['machine']['torch_threads']} torch threads; "
            f"{results['seconds'] / 60:.1f} min.", ""]
    tables = {"report_generation": report_table, "text_to_image": text_to_image_table, "image_to_image": image_to_image_table,
              "joint": joint_table, "augmentation": augmentation_table}
    parts = [head] + [table(results) for name, table in tables.items() if results.get(name)]
    if results["finding_classifiers"]:
        parts.append(classifier_table(results))
    if results.get("skipped"):
        parts.append(skipped_list(results))
    return "\n".join(line for part in parts for line in part)


def evaluate_command(results: dict) -> str:
    """The `medm2g evaluate` command line that produced ``results`` (from its recorded ``arguments``)."""
    args = results.get("arguments") or {}
    parts = ["medm2g evaluate"]
    for key, value in args.items():
        if key == "command" or value in (None, False, []):
            continue
        flag = "--" + key.replace("_", "-")
        if key == "translations":  # parsed (name, sources, target) triples, written back as SRC+SRC->TARGET
            parts += [f"{flag} '{'+'.join(sources)}->{target}'" for _, sources, target in value]
        elif value is True:
            parts.append(flag)
        elif isinstance(value, list) and all(isinstance(item, list) for item in value):
            parts += [f"{flag} {'='.join(item)}" for item in value]  # NAME=DIR pairs, one flag each
        elif isinstance(value, list):
            parts.append(f"{flag} {' '.join(map(str, value))}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def run_section(heading: str, results: dict, paired: bool = False) -> list[str]:
    """One `medm2g evaluate` run as a page section: its heading, the command that made it and its tables; with
    ``paired``, also the model-minus-baseline differences on the same images."""
    lines = [f"## {heading}", "", f"```bash\n{evaluate_command(results)}\n```", "", markdown_tables(results)]
    return lines + ["", *paired_table(results, model=results["model"])] if paired else lines


def titled_results(items: list[str]) -> list[tuple[str, dict]]:
    """``HEADING=JSON`` arguments (a results page's further runs) as ``(heading, results)``; the heading may itself
    contain ``=``, the path is after the last one. A ValueError names an item without a heading."""
    import json
    from pathlib import Path

    titled = []
    for item in items:
        heading, sep, path = item.rpartition("=")
        if not sep or not heading:
            raise ValueError(f"--also expects HEADING=JSON; got {item!r}")
        titled.append((heading, json.loads(Path(path).read_text())))
    return titled


NOTES_MARKER = "<!-- notes: written by hand below this line; every number is quoted from the tables above -->"


def write_page_keeping_notes(out, lines: list[str]) -> None:
    """Writes a generated results page atomically; the hand-written notes below `NOTES_MARKER` of the page
    already at ``out`` are kept, so regenerating the tables never loses a reading."""
    from pathlib import Path

    from ..training_utils import atomic_write_text

    out = Path(out)
    old = out.read_text() if out.is_file() else ""
    notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else "\n"
    atomic_write_text(out, "\n".join(lines) + "\n" + NOTES_MARKER + notes)
