"""timm backbones with local-file pretrained weights and a fast, clear offline failure."""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch.nn as nn


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def create_backbone(name: str, *, pretrained: bool = False, weights_file: str | Path | None = None,
                    in_chans: int = 1, **kwargs) -> nn.Module:
    """``timm.create_model`` with weights from a local file.

    Args:
        name: any timm model name (``resnet34``, ``densenet121``, ``seresnext50_32x4d``, tiny ``test_resnet``).
        pretrained: load ImageNet weights. Needs ``weights_file`` unless the Hugging Face hub is reachable and
            ``HF_HUB_OFFLINE`` is not set (``medattn`` sets it by default, so a missing file fails in
            milliseconds instead of retrying for ~45 s).
        weights_file: a ``.safetensors``/``.pth`` file of the timm model (``timm.create_model(name,
            pretrained=True)`` on a networked machine, then ``torch.save(model.state_dict(), path)``). timm drops
            a mismatched classifier and adapts the first conv to ``in_chans`` (RGB weights summed for 1 channel).
        kwargs: forwarded to ``timm.create_model`` (``num_classes``, ``features_only``, ``out_indices``,
            ``output_stride``, ``drop_rate`` ...).
    """
    if weights_file is not None:
        weights_file = Path(weights_file).expanduser()
        if not weights_file.is_file():
            raise FileNotFoundError(
                f"weights_file {weights_file} does not exist (backbone {name!r}): give the path of a .safetensors/.pth "
                f"file of timm's {name!r}, or weights_file null (with pretrained false) to start from random weights")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights_file)},
                                 in_chans=in_chans, **kwargs)
    if pretrained and hub_offline():
        raise RuntimeError(
            f"pretrained=True for backbone {name!r}, but no weights_file was given and HF_HUB_OFFLINE is set. "
            f"Pass a local weights file, e.g. `--model.net.init_args.weights_file /path/{name}.safetensors` "
            f"(save one on a networked machine with timm.create_model('{name}', pretrained=True)), "
            "or set HF_HUB_OFFLINE=0 to download from the hub."
        )
    return timm.create_model(name, pretrained=pretrained, in_chans=in_chans, **kwargs)
