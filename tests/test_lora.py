"""LoRA adapters on `MedM2GPipeline` (loaders/lora.py) and the fine-tuning script (training/finetune_lora.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict
from peft import LoraConfig

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.data.datasets import canonical_features
from medm2g_diffusers.data.phantoms import PhantomGenerator
from medm2g_diffusers.loaders import lora_target_modules, read_lora_metadata
from tiny_pipeline import SIZE, get_dummy_components
from training_scripts import load_training_script

T1 = np.random.default_rng(0).uniform(0, 100, (SIZE, SIZE)).astype(np.float32)
T2 = np.random.default_rng(1).uniform(0, 100, (SIZE, SIZE)).astype(np.float32)


@pytest.fixture
def pipe():
    pipe = MedM2GPipeline(**get_dummy_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, target="ct", conditions=None, **kwargs):
    conditions = conditions or {"mri_t1": T1, "mri_t2": T2}
    return pipe(conditions=conditions, targets=[target], num_inference_steps=2, generator=torch.manual_seed(0),
                output_type="np", **kwargs).images[target]


def add_random_adapter(pipe, name, families=("ct",), seed=0, targets="attention", use_dora=False):
    """An adapter whose LoRA B matrices are moved off their zero start, so it changes outputs."""
    config = LoraConfig(r=2, lora_alpha=2, target_modules=lora_target_modules(pipe.multiflow, list(families), targets), use_dora=use_dora)
    pipe.add_lora_adapter(config, name, {"task": f"test {name}"})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in pipe.multiflow.named_parameters():
            if f"lora_B.{name}." in parameter_name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)


def test_target_modules_presets(pipe):
    attention = lora_target_modules(pipe.multiflow, ["ct"])
    everything = lora_target_modules(pipe.multiflow, ["ct"], "all")
    assert "unets.ct.conv_in" in attention and all(name.startswith("unets.ct.") for name in everything)
    assert any(name.endswith("processor.to_k_guide") for name in attention)  # θ_c, the cross-guided sublayer
    assert any(name.endswith("attn2.to_q") for name in attention)
    assert not any("resnets" in name for name in attention) and any("resnets" in name for name in everything)
    with pytest.raises(ValueError, match="targets must be one of"):
        lora_target_modules(pipe.multiflow, ["ct"], "convs")
    with pytest.raises(ValueError, match="families must be a non-empty subset"):
        lora_target_modules(pipe.multiflow, ["pet"])


def test_adapter_changes_output_and_unloading_restores_the_base_exactly(pipe):
    base = generate(pipe)
    add_random_adapter(pipe, "a")
    adapted = generate(pipe)
    assert np.abs(adapted - base).max() > 1e-3
    assert np.array_equal(generate(pipe, target="xray", conditions={"ct": T1 * 10}), generate(pipe, target="xray", conditions={"ct": T1 * 10}, adapter_names=[]))  # other denoisers untouched
    pipe.unload_lora_weights()
    assert np.array_equal(generate(pipe), base)
    assert pipe.get_list_adapters() == [] and not any("lora" in name for name, _ in pipe.multiflow.named_modules())


def test_save_load_round_trip_is_bit_for_bit(pipe, tmp_path):
    add_random_adapter(pipe, "a")
    adapted = generate(pipe)
    pipe.save_lora_weights(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "medm2g_lora.json"]
    assert read_lora_metadata(tmp_path / "adapter")["task"] == "test a"

    fresh = MedM2GPipeline(**get_dummy_components())
    fresh.set_progress_bar_config(disable=True)
    assert fresh.load_lora_weights(tmp_path / "adapter") == "a"
    assert np.array_equal(generate(fresh), adapted)
    assert fresh.load_lora_weights(tmp_path / "adapter", adapter_name="again") == "again"  # the same folder twice
    with pytest.raises(ValueError, match="already loaded"):
        fresh.load_lora_weights(tmp_path / "adapter")
    with pytest.raises(ValueError, match="not a MedM2G LoRA adapter folder"):
        fresh.load_lora_weights(tmp_path)


def test_dora_adapter_round_trips_and_unloads_to_the_base(pipe, tmp_path):
    # DoRA (lora.use_dora in training/configs/lora.yaml) adds a per-output magnitude vector beside A and B:
    # it must be saved, restored bit for bit, and removed with the rest.
    base = generate(pipe)
    add_random_adapter(pipe, "d", targets="all", use_dora=True)
    assert any("lora_magnitude_vector.d" in name for name, _ in pipe.multiflow.named_parameters())
    adapted = generate(pipe)
    assert np.abs(adapted - base).max() > 1e-3
    pipe.save_lora_weights(tmp_path / "adapter")
    fresh = MedM2GPipeline(**get_dummy_components())
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(tmp_path / "adapter")
    assert np.array_equal(generate(fresh), adapted)
    fresh.unload_lora_weights()
    assert np.array_equal(generate(fresh), base)


def test_adapters_switch_per_call_and_the_pipeline_choice_comes_back(pipe):
    base = generate(pipe)
    add_random_adapter(pipe, "a", seed=0)
    only_a = generate(pipe)
    add_random_adapter(pipe, "b", seed=1)  # the newest adapter becomes the active one
    only_b = generate(pipe)
    assert pipe.get_active_adapters() == ["b"] and np.abs(only_b - only_a).max() > 1e-3
    assert np.array_equal(generate(pipe, adapter_names=["a"]), only_a)
    assert np.array_equal(generate(pipe, adapter_names=[]), base)
    assert np.array_equal(generate(pipe), only_b)  # the per-call choice did not stick
    both = generate(pipe, adapter_names=["a", "b"])
    assert np.abs(both - only_a).max() > 1e-3 and np.abs(both - only_b).max() > 1e-3

    out = pipe(conditions={"mri_t1": T1}, targets=["ct"], num_inference_steps=2, adapter_names="a")
    assert out.provenance["ct"]["lora_adapters"][0]["name"] == "a"  # provenance says which adapter made it
    pipe.set_adapters(["a", "b"], [1.0, 0.0])
    assert np.array_equal(generate(pipe), only_a)  # weight 0 turns b off
    pipe.disable_lora()
    assert np.array_equal(generate(pipe), base) and pipe.get_active_adapters() == []
    pipe.enable_lora()
    assert pipe.get_active_adapters() == ["a", "b"]

    pipe.delete_adapters("b")
    assert pipe.get_list_adapters() == ["a"] and np.array_equal(generate(pipe), only_a)
    pipe.delete_adapters(["a"])
    assert np.array_equal(generate(pipe), base)


def test_bad_adapter_arguments_name_the_parameter(pipe, tmp_path):
    add_random_adapter(pipe, "a")
    with pytest.raises(ValueError, match=r"adapter_names names adapters that are not loaded: \['nope'\]"):
        generate(pipe, adapter_names=["nope"])
    with pytest.raises(ValueError, match="adapter_weights must be finite numbers"):
        pipe.set_adapters(["a"], [float("nan")])
    with pytest.raises(ValueError, match="adapter_name must be a new non-empty name"):
        add_random_adapter(pipe, "a")
    with pytest.raises(ValueError, match="save them with save_lora_weights"):
        pipe.save_pretrained(tmp_path / "pipe")  # would not reload: refused rather than written wrong


def test_new_source_slot_keeps_the_base_and_carries_loaded_adapters(pipe, tmp_path):
    add_random_adapter(pipe, "ct_adapter", families=("mri",))
    before = generate(pipe, target="mri_flair")
    base_before = generate(pipe, target="mri_flair", adapter_names=[])
    assert "mri_t1c" not in pipe.accepted_conditions("mri_flair")
    pipe.extend_for({"mri": ["mri_t1", "mri_t2", "mri_pd", "mri_flair", "mri_t1c"]}, {"mri_t1c": "mri_t1"})
    assert "mri_t1c" in pipe.accepted_conditions("mri_flair") and pipe.multiflow.unets["mri"].config.in_channels == 4 * 6 + 5
    # The base and the carried adapter (its conv_in LoRA padded with zeros for the new slot) compute what they did.
    assert np.array_equal(generate(pipe, target="mri_flair"), before)
    assert np.array_equal(generate(pipe, target="mri_flair", adapter_names=[]), base_before)
    with_t1c = generate(pipe, target="mri_flair", conditions={"mri_t1": T1, "mri_t2": T2, "mri_t1c": T1 * 1.5})
    assert with_t1c.shape == before.shape

    # An adapter saved on the extended model extends a fresh base when it loads.
    pipe.save_lora_weights(tmp_path / "adapter")
    fresh = MedM2GPipeline(**get_dummy_components())
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(tmp_path / "adapter")
    assert fresh.multiflow.source_slots_of("mri")[-1] == "mri_t1c"
    assert np.array_equal(generate(fresh, target="mri_flair"), before)
    with pytest.raises(ValueError, match="slots may only be appended"):
        fresh.extend_for({"mri": ["mri_t2", "mri_t1"]})


def test_a_model_refuses_contrasts_it_was_not_trained_on(pipe):
    assert "mri_t1c" not in pipe.supported_targets() and "mri_t1c" not in pipe.accepted_conditions("text")
    with pytest.raises(ValueError, match=r"cannot condition 'ct' on \['mri_t1c'\]"):
        generate(pipe, conditions={"mri_t1c": T1})
    with pytest.raises(ValueError, match="was not trained on"):
        pipe.prompt_encoders.encode("mri_t1c", torch.zeros(1, 1, SIZE, SIZE))
    extended = pipe.prompt_encoders.with_contrasts({"mri_t1c": "mri_t1"})
    x = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    assert torch.equal(extended.encode("mri_t1c", x).tokens, extended.encode("mri_t1", x).tokens)
    assert torch.equal(extended.encode("mri_t2", x).tokens, pipe.prompt_encoders.encode("mri_t2", x).tokens)
    with pytest.raises(ValueError, match="must come next in registry order"):
        extended.with_contrasts({"mri_t1c": "mri_t1"})


# ---------------------------------------------------------------------------------------------- finetune


def make_dataset(path):
    """Head phantoms with a made-up T1c (T1 with a brighter lesion stand-in), chest phantoms with reports."""
    generator = PhantomGenerator(seed=3, size=SIZE)
    splits = {}
    for split, first, count in (("train", 0, 6), ("validation", 100, 3), ("test", 200, 1)):
        rows = {name: [] for name in canonical_features(SIZE)}
        for i in range(first, first + count):
            for anatomy in ("head", "chest"):
                patient = generator.patient(i, anatomy=anatomy)
                images = dict(patient.images)
                images["mri_t1c"] = images["mri_t1"] * 1.2 if anatomy == "head" else None
                for name in rows:
                    rows[name].append(images.get(name) if name in images else {"patient_id": f"{split}-{i}-{anatomy}",
                                                                                  "anatomy": anatomy, "report": patient.report}.get(name))
        splits[split] = Dataset.from_dict(rows, features=canonical_features(SIZE))
    DatasetDict(splits).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    base = root / "base"
    MedM2GPipeline(**get_dummy_components()).save_pretrained(base)
    data = make_dataset(root / "data")
    config = {
        "defaults": {"seed": 0, "checkpointing_steps": 2, "checkpoints_total_limit": 2},
        "base_model": str(base), "output_root": str(root / "runs"),
        "finetune": {
            "train_batch_size": 4, "max_train_steps": 3, "lora_learning_rate": 1e-2, "learning_rate": 1e-3, "scratch_learning_rate": 1e-3,
            "lr_scheduler": "constant", "lr_warmup_steps": 0, "max_grad_norm": 1.0, "condition_dropout": 0.1, "max_text_tokens": 64,
            "lora": {"rank": 2, "alpha": 2, "targets": "attention"},
            "augment": {"copies": 2, "max_rotation_deg": 5, "max_shift": 0.05, "scale": [0.95, 1.05]},
            "validation_steps": 3, "num_validation_rows": 2, "validation_inference_steps": 2, "guidance_scale": 2.0,
        },
        "tasks": {
            "t1c_flair": {"dataset": str(data), "kind": "translation", "sources": ["mri_t1", "mri_t1c"], "target": "mri_flair",
                          "contrast_init": {"mri_t1c": "mri_t1"}},
            "mri_to_ct": {"dataset": str(data), "kind": "translation", "sources": ["mri_t2"], "target": "ct"},
            "report_xray": {"dataset": str(data), "kind": "report_image", "image": "xray"},
        },
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def finetune(workspace, *args):
    return load_training_script("finetune_lora").main(["--config", str(workspace / "config.yaml"), *args])


def test_finetune_lora_trains_only_the_adapter_and_its_folder_loads(workspace):
    result = finetune(workspace, "--task", "t1c_flair", "--output_dir", str(workspace / "t1c_lora"))
    folder = workspace / "runs" / "t1c_flair" / "lora"
    metadata = read_lora_metadata(folder)
    assert metadata["source_slots"]["mri"][-1] == "mri_t1c" and metadata["contrast_init"] == {"mri_t1c": "mri_t1"}
    budget = result["budget"]
    assert budget["steps"] == 3 and budget["mode"] == "lora" and budget["trainable_parameters"] > 0
    assert json.loads((workspace / "t1c_lora" / "budget.json").read_text())["samples_seen"] == 3 * 4
    assert "mri_flair" in result["validation"]["3"] and np.isfinite(result["validation"]["3"]["mri_flair"]["psnr_mean"])

    pipe = MedM2GPipeline.from_pretrained(str(workspace / "base"))
    pipe.set_progress_bar_config(disable=True)
    base_state = {k: v.clone() for k, v in pipe.multiflow.state_dict().items()}
    pipe.load_lora_weights(folder)
    conditions = {"mri_t1": T1, "mri_t1c": T1 * 1.2}
    adapted = generate(pipe, "mri_flair", conditions)
    assert np.abs(adapted - generate(pipe, "mri_flair", conditions, adapter_names=[])).max() > 0
    pipe.unload_lora_weights()
    # Nothing but the adapter trained: the (extended) base weights are the saved base's.
    for key, value in pipe.multiflow.state_dict().items():
        if key in base_state and base_state[key].shape == value.shape:
            assert torch.equal(value, base_state[key]), key


def test_finetune_resume_gives_the_uninterrupted_next_losses(workspace):
    full = finetune(workspace, "--task", "mri_to_ct", "--output_dir", str(workspace / "resume_full"), "--max_train_steps", "4")
    finetune(workspace, "--task", "mri_to_ct", "--output_dir", str(workspace / "resume_part"), "--max_train_steps", "4",
             "--set", "defaults.checkpointing_steps=2", "--set", "finetune.validation_steps=100")
    # A run killed after its checkpoint at step 2: resume it from there (drop the later checkpoints).
    import shutil

    for checkpoint in (workspace / "resume_part").glob("checkpoint-*"):
        if checkpoint.name != "checkpoint-2":
            shutil.rmtree(checkpoint)
    resumed = finetune(workspace, "--task", "mri_to_ct", "--output_dir", str(workspace / "resume_part"), "--max_train_steps", "4",
                       "--resume_from_checkpoint", "latest")
    assert [r["step"] for r in resumed["history"]] == [3, 4]
    assert [r["loss"] for r in resumed["history"]] == pytest.approx([r["loss"] for r in full["history"][2:]], abs=1e-6)


@pytest.mark.parametrize("mode", [["--full"], ["--init", "scratch"]])
def test_full_and_scratch_modes_save_whole_pipelines(workspace, mode):
    result = finetune(workspace, "--task", "report_xray", "--output_dir", str(workspace / f"modes{len(mode)}"), *mode)
    assert result["budget"]["streams"] == ["xray", "text"]  # both directions of report <-> X-ray train
    assert result["budget"]["trainable_parameters"] == sum(
        p.numel() for family in ("xray", "text") for p in MedM2GPipeline.from_pretrained(str(workspace / "base")).multiflow.unets[family].parameters()
    )
    pipe = MedM2GPipeline.from_pretrained(result["model_dir"])
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="Small left pleural effusion.", targets=["xray"], num_inference_steps=2, output_type="np")
    assert out.images["xray"].shape == (1, SIZE, SIZE)


def test_finetune_config_errors_name_the_task(workspace):
    script = load_training_script("finetune_lora")
    with pytest.raises(ValueError, match=r"--task must be one of the config's tasks"):
        finetune(workspace, "--task", "nope")
    config = yaml.safe_load((workspace / "config.yaml").read_text())
    config["tasks"]["bad"] = {"dataset": "x", "kind": "translation", "target": "ct"}
    with pytest.raises(ValueError, match=r"tasks.bad \(translation\) needs \['sources'\]"):
        script.task_config(config, "bad")
    config["tasks"]["bad"] = {"dataset": "x", "kind": "translation", "sources": ["mri_t1c"], "target": "ct"}
    cfg = script.task_config(config, "bad")
    pipe = MedM2GPipeline(**get_dummy_components())
    with pytest.raises(ValueError, match="set tasks.bad.contrast_init"):
        script.prepare_model(pipe, cfg, script.task_streams(cfg), "lora", 0)


def test_cli_loads_an_adapter_folder_onto_its_base(workspace, tmp_path, capsys):
    from medm2g_diffusers.cli import load_pipeline, main
    from medm2g_diffusers.data.io import read_provenance, write_nifti

    pipe = MedM2GPipeline.from_pretrained(str(workspace / "base"))
    add_random_adapter(pipe, "cli", families=("ct",))
    pipe.save_lora_weights(tmp_path / "adapter")
    loaded = load_pipeline(str(tmp_path / "adapter"))
    assert loaded.get_list_adapters() == ["cli"] and loaded.lora_metadata("cli")["base_model"] == str(workspace / "base")
    write_nifti(tmp_path / "t2.nii.gz", T2, provenance={"model": "test"})
    code = main(["generate", "--model", str(tmp_path / "adapter"), "--condition", f"mri_t2={tmp_path / 't2.nii.gz'}",
                 "--targets", "ct", "--steps", "2", "--out", str(tmp_path / "out")])
    assert code == 0
    assert read_provenance(tmp_path / "out" / "ct_0.png")["lora_adapters"][0]["name"] == "cli"


def test_finetune_snr_gamma_weights_the_loss_and_is_recorded(workspace):
    def first_step(gamma):
        result = finetune(workspace, "--task", "mri_to_ct", "--output_dir", str(workspace / f"snr_{gamma}"), "--max_train_steps", "1",
                          "--set", f"finetune.snr_gamma={gamma}", "--set", "finetune.validation_steps=100")
        return result["history"][0]["loss"], result["budget"]["snr_gamma"]

    (plain, recorded_plain), (weighted, recorded) = first_step("null"), first_step("5.0")
    assert recorded_plain is None and recorded == 5.0
    # Same seed, same batch and noise: only the per-sample Min-SNR weights differ.
    assert np.isfinite(weighted) and weighted != pytest.approx(plain, rel=1e-4)
