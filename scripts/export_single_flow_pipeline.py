"""Wraps the stage-2 single-flow LDMs of an output root as a MedM2GPipeline: the "plain conditional LDM" baseline.

    python scripts/export_single_flow_pipeline.py --root runs/tiny --out runs/tiny/pipeline_single_flow

Each family's denoiser is the `UNet2DConditionModel` (text: `MedM2GTextUNet`) that `train_ldm.py` wrote to
`<root>/unet_<family>`, conditioned on the prompt-encoder tokens of `<root>/prompt_encoders`; θ_c is zero
(`from_single_flow`), so jointly generated targets do not see each other and no image source slot exists.
The tokenizer, VAEs and prompt encoders are the root's own (stage 0-1), so comparing this pipeline with the
root's multi-flow `pipeline` compares stage 3 and nothing else.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import PreTrainedTokenizerFast

from medm2g_diffusers import MedM2GMultiFlowModel, MedM2GPipeline, MedM2GPromptEncoders, MedM2GTextUNet, MedM2GTextVAE
from medm2g_diffusers.training_utils import atomic_save_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="an output_root with tokenizer, vae, text_vae, prompt_encoders, unet_<family>")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    root = Path(args.root)
    for name in ("tokenizer", "vae", "text_vae", "prompt_encoders"):
        if not (root / name).is_dir():
            raise FileNotFoundError(f"{root / name} does not exist: train stages 0-1 into {root} first")
    folders = sorted(root.glob("unet_*"))
    if not folders:
        raise FileNotFoundError(f"no {root}/unet_<family> folder: train them with training/train_ldm.py")
    unets, prediction_types = {}, set()
    for path in folders:
        family = path.name.removeprefix("unet_")
        unets[family] = (MedM2GTextUNet if family == "text" else UNet2DConditionModel).from_pretrained(str(path))
        prediction_types.add(DDIMScheduler.from_pretrained(str(path)).config.prediction_type)
    if len(prediction_types) != 1:
        raise ValueError(f"the denoisers in {root} were trained for different prediction types {sorted(prediction_types)}")
    pipe = MedM2GPipeline(
        multiflow=MedM2GMultiFlowModel.from_single_flow(unets),
        vae=AutoencoderKL.from_pretrained(str(root / "vae")),
        text_vae=MedM2GTextVAE.from_pretrained(str(root / "text_vae")),
        prompt_encoders=MedM2GPromptEncoders.from_pretrained(str(root / "prompt_encoders")),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(str(root / "tokenizer")),
        scheduler=DDIMScheduler.from_pretrained(str(folders[0])),
    )
    atomic_save_pretrained(pipe, args.out)
    print(f"wrote {args.out} (families {sorted(unets)})")


if __name__ == "__main__":
    main()
