"""Scale-out tooling without a GPU. The accelerate configs in training/configs/accelerate/: each loads with
accelerate's own config loader and `accelerate launch` validation, FSDP's settings reach the plugin accelerate builds
and wrap the base denoisers, and the CPU DDP config really starts 2 gloo processes. benchmarks/gpu_check.sh: says so
and exits 0 without a GPU, and its --dry-run runs the whole measurement code on CPU at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from accelerate.utils.launch import prepare_multi_gpu_env
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from torch.distributed.fsdp import CPUOffloadPolicy

from medm2g_diffusers.models import MedM2GMultiFlowModel, MedM2GTextUNet
from medm2g_diffusers.single_flow import build_image_unet

from free_port import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "training" / "configs" / "accelerate"
EXPECTED = {  # file -> (distributed type, processes, mixed precision)
    "single_gpu": (DistributedType.NO, 1, "bf16"),
    "multi_gpu_ddp": (DistributedType.MULTI_GPU, 8, "bf16"),
    "fsdp": (DistributedType.FSDP, 8, "bf16"),
    "cpu_ddp_gloo": (DistributedType.MULTI_GPU, 2, "no"),  # torchrun's launcher; the processes run MULTI_CPU
}
# One file per process: the processes share stdout, and their lines can interleave.
PROBE = """import json, sys
from pathlib import Path
from accelerate import Accelerator
a = Accelerator()
seen = [a.process_index, a.num_processes, str(a.distributed_type), a.state.backend]
Path(sys.argv[1], f"probe-{a.process_index}.json").write_text(json.dumps(seen))
"""


def launch_args(name: str):
    """What `accelerate launch --config_file <name>.yaml script.py` validates and runs with."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "script.py"])
    return _validate_launch_command(args)[0]


def test_every_config_is_tested():
    assert sorted(path.stem for path in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerates_loader(name):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    distributed_type, processes, precision = EXPECTED[name]
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type, config.num_processes, config.mixed_precision) == (distributed_type, processes, precision)
    assert config.use_cpu is (name == "cpu_ddp_gloo")
    args = launch_args(name)
    assert (args.num_processes, args.mixed_precision) == (processes, precision)
    assert args.multi_gpu is (distributed_type == DistributedType.MULTI_GPU) and args.use_fsdp is (distributed_type == DistributedType.FSDP)


def test_fsdp_keys_are_launch_options():
    # `accelerate launch` copies fsdp_config keys onto its arguments without checking them: a misspelt key is ignored.
    options = {o.lstrip("-") for action in launch_command_parser()._actions for o in action.option_strings}
    keys = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert keys and not [key for key in keys if key not in options]


@pytest.fixture(scope="module")
def fsdp_plugin():
    """The FSDP plugin each training process builds from the environment `accelerate launch` gives it."""
    env = prepare_multi_gpu_env(launch_args("fsdp"))
    assert env["ACCELERATE_USE_FSDP"] == "true"
    with mock.patch.dict(os.environ, env):
        return FullyShardedDataParallelPlugin()


def test_fsdp_plugin_settings(fsdp_plugin):
    assert fsdp_plugin.fsdp_version == 2 and fsdp_plugin.reshard_after_forward is True
    assert fsdp_plugin.transformer_cls_names_to_wrap == ["ResnetBlock2D", "BasicTransformerBlock"]
    assert fsdp_plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert not isinstance(fsdp_plugin.cpu_offload, CPUOffloadPolicy)


def test_fsdp_wraps_the_blocks_of_the_image_and_multiflow_denoisers(fsdp_plugin):
    image_unet = build_image_unet(8, 4, 16, (8, 16), 1, 8, None, 8)
    text_unet = MedM2GTextUNet(in_channels=8, hidden_dim=16, num_blocks=1, cross_attention_dim=16, attention_head_dim=8)
    multiflow = MedM2GMultiFlowModel.from_single_flow(
        {"xray": image_unet, "text": text_unet}, {"hidden_dim": 8, "token_grid": 2, "num_latent_tokens": 2, "num_adaptive_tokens": 2, "norm_num_groups": 4}
    )
    for model in (image_unet, multiflow):
        policy = fsdp2_prepare_auto_wrap_policy(fsdp_plugin, model)
        wrapped = [module for module in model.modules() if policy(module)]
        kinds = {type(module) for module in wrapped}
        assert kinds == {ResnetBlock2D, BasicTransformerBlock}
        assert len(wrapped) == sum(isinstance(m, (ResnetBlock2D, BasicTransformerBlock)) for m in model.modules())
    # The text denoiser has neither class: accelerate refuses it, so it trains with multi_gpu_ddp.yaml (the comment says so).
    with pytest.raises(ValueError, match="Could not find the transformer layer class"):
        fsdp2_prepare_auto_wrap_policy(fsdp_plugin, text_unet)


def test_cpu_ddp_config_starts_two_gloo_processes(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_ddp_gloo.yaml"),
               "--main_process_port", str(free_port()), str(script), str(tmp_path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    seen = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("probe-*.json"))]
    assert seen == [[0, 2, "DistributedType.MULTI_CPU", "gloo"], [1, 2, "DistributedType.MULTI_CPU", "gloo"]]
    assert torch.distributed.is_gloo_available()


# ----------------------------------------------------------------------------------------- gpu_check.sh


def gpu_check(tmp_path, *args, nvidia_smi: str | None):
    """Runs gpu_check.sh with PATH's nvidia-smi replaced by a stub (``nvidia_smi``: its script body) or hidden."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    if nvidia_smi is not None:
        (stubs / "nvidia-smi").write_text("#!/bin/sh\n" + nvidia_smi)
        (stubs / "nvidia-smi").chmod(0o755)
    path = ":".join([str(stubs)] + [p for p in os.environ["PATH"].split(":") if not (Path(p) / "nvidia-smi").exists()])
    env = {**os.environ, "PATH": path, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=280, check=False)


@pytest.mark.parametrize(
    "nvidia_smi, message",
    [(None, "nvidia-smi is not on PATH"), ("exit 9\n", "nvidia-smi lists no device")],
)
def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path, nvidia_smi, message):
    completed = gpu_check(tmp_path, "--out", str(tmp_path / "out.json"), nvidia_smi=nvidia_smi)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.startswith("no GPU: ") and message in completed.stdout
    assert not (tmp_path / "out.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA device")
def test_gpu_check_with_a_card_but_no_cuda_torch_says_so(tmp_path):
    completed = gpu_check(tmp_path, nvidia_smi="echo 'NVIDIA H100 80GB HBM3, 81559 MiB, 550.54'\n")
    assert completed.returncode == 0 and "torch.cuda is not available" in completed.stdout


def test_gpu_check_dry_run_measures_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    completed = gpu_check(tmp_path, "--dry-run", "--train-steps", "3", "--phantoms", "12", "--out", str(out), nvidia_smi=None)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["card"] is None
    assert result["inference"]["images_per_second"] > 0 and len(result["inference"]["seconds_per_call"]) == 1
    assert result["training"]["samples_per_second"] > 0 and result["training"]["timed_steps"] == 1
