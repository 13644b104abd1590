"""Markdown tables, shaped like the paper's, from the results dict of :func:`~.benchmark.run_benchmark`."""

from __future__ import annotations

from typing import Any


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _methods(results: dict, entry: dict) -> list[str]:
    """The pipelines scored in ``entry``: the model first, then the baselines, in the run's order."""
    return [name for name in [results["model"], *results["baselines"]] if name in entry]


def report_table(results: dict) -> list[str]:
    r = results["report_generation"]
    lines = [f"### Report generation (X-ray -> report, {r['n']} held-out chest patients)", "",
             "| method | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | finding F1 (micro) | finding F1 (macro) | exact findings |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in [*_methods(results, r), "nearest_neighbour"]:
        m = r[name]
        label = "nearest-neighbour retrieval (pixels)" if name == "nearest_neighbour" else name
        lines.append(f"| {label} | " + " | ".join(_f(m[f"bleu_{n}"]) for n in range(1, 5))
                     + f" | {_f(m['rouge_l'])} | {_f(m['finding']['micro_f1'])} | {_f(m['finding']['macro_f1'])} | {_f(m['finding']['exact_match'])} |")
    lines += ["", f"Protocol: {r[results['model']]['protocol'] if results['model'] in r else ''} The labeller scores "
              f"{_f(r['labeller_on_references']['micro_f1'])} micro F1 on the reference reports themselves.", ""]
    return lines


def text_to_image_table(results: dict) -> list[str]:
    lines = ["### Text -> image (held-out reports; finding accuracy by classifiers trained on real phantoms only)", "",
             "| modality | method | n | FID ↓ | MS-SSIM diversity ↓ | finding exact-set accuracy | finding macro F1 | classifier on real: exact / macro F1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for target, entry in results["text_to_image"].items():
        real = entry["classifier_on_real"]
        for name in _methods(results, entry):
            m = entry[name]
            lines.append(f"| {target} | {name} | {entry['n']} | {_f(m['fid']['fid'] if 'fid' in m else None, 1)} | {_f(m['ms_ssim_diversity']['ms_ssim'])} | "
                         f"{_f(m['finding']['exact_set_accuracy'])} | {_f(m['finding']['macro_f1'])} | "
                         f"{_f(real['exact_set_accuracy'])} / {_f(real['macro_f1'])} |")
    first = next(iter(results["text_to_image"].values()), {})
    model = first.get(results["model"], {})
    if "fid" in model:
        lines += ["", f"FID: {model['fid'].get('protocol', '')}"]
    if "ms_ssim_diversity" in model:
        lines += ["", f"Diversity: {model['ms_ssim_diversity'].get('protocol', '')}"]
    return lines + [""]


def image_to_image_table(results: dict) -> list[str]:
    names = [results["model"], *results["baselines"]]
    lines = ["### Image -> image (PSNR dB / SSIM on held-out patients)", "",
             "| task | n | " + " | ".join(names) + " | copy the source |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " | --- |"]
    protocol = ""
    for task, entry in results["image_to_image"].items():
        cells = [f"{_f(entry[n]['psnr_mean'], 2)} / {_f(entry[n]['ssim_mean'])}" if n in entry else "cannot" for n in names]
        copy = entry["copy_source"]
        lines.append(f"| {task} | {entry['n']} | " + " | ".join(cells) + f" | {_f(copy['psnr_mean'], 2)} / {_f(copy['ssim_mean'])} |")
        protocol = entry["protocol"]
    return lines + ["", f"Protocol: {protocol}.", ""]


def joint_table(results: dict) -> list[str]:
    lines = ["### Joint generation (one report -> several modalities in one loop): finding agreement between modalities", "",
             "| anatomy | pair | types both classifiers see | real images (ceiling) | " + " | ".join(
                 f"{n} joint | {n} uncoupled" for n in [results["model"], *results["baselines"]]) + " |",
             "| --- | --- | --- | --- | " + " | ".join("--- | ---" for _ in [results["model"], *results["baselines"]]) + " |"]
    for anatomy, entry in results["joint"].items():
        for pair, info in entry["pairs"].items():
            cells = []
            for name in [results["model"], *results["baselines"]]:
                for label in ("joint", "uncoupled"):
                    value = entry.get(f"{name}/{label}", {}).get("agreement", {}).get(pair)
                    cells.append(_f(value))
            lines.append(f"| {anatomy} (n={entry['n']}) | {pair} | {', '.join(info['types']) or 'none'} | "
                         f"{_f(entry['real'][pair])} | " + " | ".join(cells) + " |")
    lines += ["", "Agreement: the fraction of patients whose two generated images get the same findings from the "
              "per-modality classifiers, over the finding types both classifiers detect on real test images "
              "(F1 >= 0.5). Uncoupled: the same targets and seeds with `cross_guidance_scale=0`.", ""]
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


def markdown_tables(results: dict) -> str:
    """All tables of a benchmark run, with the data and machine they came from."""
    head = [f"Model `{results['model']}`; baselines: {', '.join(results['baselines']) or 'none'}; data: {results['data']}; "
            f"{results['config']['num_inference_steps']} DDIM steps, guidance {results['config']['guidance_scale']}; "
            f"{results['machine']['processor']}, {results['machine']['torch_threads']} torch threads; "
            f"{results['seconds'] / 60:.1f} min.", ""]
    tables = {"report_generation": report_table, "text_to_image": text_to_image_table, "image_to_image": image_to_image_table,
              "joint": joint_table, "augmentation": augmentation_table}
    parts = [head] + [table(results) for name, table in tables.items() if name in results]
    if results["finding_classifiers"]:
        parts.append(classifier_table(results))
    return "\n".join(line for part in parts for line in part)
