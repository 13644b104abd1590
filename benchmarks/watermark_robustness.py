"""Does an invisible watermark survive what happens to a shared medical image? (issue: provenance that can be checked)

Embeds a 48-bit mark with the `invisible-watermark` package (DWT-DCT, the method diffusers uses for SDXL)
into grey phantom images, then re-saves and transforms them and reports, per transform, the mean fraction of
bits recovered and the share of images whose whole mark is recovered. Also the PSNR cost of embedding, and
whether 64 px images (medm2g-tiny's size) can carry a mark at all (the package needs >= 256x256).

    python benchmarks/watermark_robustness.py --n 40 --size 256 --out docs/results/watermark.json
"""

from __future__ import annotations

import argparse
import io
import json
import time

import cv2
import numpy as np
from PIL import Image

from medm2g_diffusers.data.phantoms import PhantomGenerator

MARK = np.unpackbits(np.frombuffer(b"MedM2G", dtype=np.uint8)).tolist()  # 48 bits
# The package embeds in the chroma channels by default ([0, 36, 36]), which a grey image does not keep; we
# measure that default and luma embedding at several strengths (the quantisation step of the DCT maxima).
STRENGTHS = {"chroma_36 (package default)": [0, 36, 36], "luma_8": [8, 0, 0], "luma_16": [16, 0, 0], "luma_36": [36, 0, 0]}


def to_display(array: np.ndarray) -> np.ndarray:
    low, high = np.percentile(array, [0.5, 99.5])
    return np.rint(np.clip((array - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


def embed(grey: np.ndarray, scales: list[int]) -> np.ndarray:
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", MARK)
    bgr = encoder.encode(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), "dwtDct", scales=scales)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)  # medical images are grey: keep one channel


def decode(grey: np.ndarray, scales: list[int]) -> np.ndarray:
    from imwatermark import WatermarkDecoder

    decoder = WatermarkDecoder("bits", len(MARK))
    return np.asarray(decoder.decode(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), "dwtDct", scales=scales), dtype=np.uint8)


def png_resave(grey: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))


def jpeg(quality: int):
    def apply(grey: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(grey).save(buffer, format="JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    return apply


def resize(factor: float, back: bool):
    def apply(grey: np.ndarray) -> np.ndarray:
        side = grey.shape[0]
        image = Image.fromarray(grey).resize((int(side * factor),) * 2, Image.BICUBIC)
        if back:
            image = image.resize((side, side), Image.BICUBIC)
        return np.asarray(image)
    return apply


TRANSFORMS = {
    "none": lambda g: g,
    "png_resave": png_resave,
    "jpeg_q95": jpeg(95),
    "jpeg_q75": jpeg(75),
    "resize_x2": resize(2.0, back=False),
    "resize_x0.5_and_back": resize(0.5, back=True),
    "resize_x0.75": resize(0.75, back=False),
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    generator = PhantomGenerator(seed=args.seed, size=args.size)
    originals = []
    for i in range(args.n):
        patient = generator.patient(i)
        key = ("xray", "ct", "mri_t2")[i % 3]
        if patient.images.get(key) is None:
            key = next(k for k in ("xray", "ct", "mri_t2") if patient.images.get(k) is not None)
        originals.append(to_display(patient.images[key]))
    results = {"size": args.size, "images": args.n, "bits": len(MARK), "strengths": {}}
    for label, scales in STRENGTHS.items():
        marked = [embed(g, scales) for g in originals]
        row = {"scales": scales, "embedding_psnr_db": round(float(np.mean([psnr(a, b) for a, b in zip(originals, marked)])), 2),
               # what a decoder reads from an unmarked image: the chance level to compare with
               "unmarked_bit_accuracy": round(float(np.mean([np.mean(decode(g, scales) == MARK) for g in originals])), 3)}
        for name, transform in TRANSFORMS.items():
            accuracies = []
            for image in marked:
                transformed = transform(image)
                if min(transformed.shape) < 256:
                    accuracies.append(float("nan"))  # the package refuses images under 256x256
                    continue
                accuracies.append(float(np.mean(decode(transformed, scales) == MARK)))
            accuracies = np.asarray(accuracies)
            row[name] = {
                "mean_bit_accuracy": round(float(np.nanmean(accuracies)), 3) if np.isfinite(accuracies).any() else None,
                "all_bits_recovered": round(float(np.mean(accuracies == 1.0)), 3),
                "undecodable": int(np.isnan(accuracies).sum()),
            }
        results["strengths"][label] = row
    small = originals[0][::4, ::4]  # 64 px when --size is 256
    try:
        embed(small, STRENGTHS['luma_16'])
        results["embeds_at_64px"] = True
    except RuntimeError as error:
        results["embeds_at_64px"] = False
        results["error_at_64px"] = str(error)
    results["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
