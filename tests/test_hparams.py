"""What each registered method records as hyper-parameters when built in Python (``module.hparams``, written into
every checkpoint and read back by ``load_from_checkpoint``): every constructor argument except the injected
objects that a checkpoint cannot hold as data. ``MedAttnModule.__init__`` saves them once for the whole
``__init__`` chain (Lightning collects each subclass's arguments from its frame), so the methods do not call
``save_hyperparameters`` themselves; these tests pin the result per method.
"""

from __future__ import annotations

import inspect

import pytest

from lightning_modules.base import MedAttnModule, default_optimizer
from lightning_modules.registry import METHODS
from reliability_utils import build, method_names

# Arguments each method keeps out of its hyper-parameters (Python objects: the network, and for some methods the
# optimiser/scheduler callables, which may be lambdas that do not pickle).
NOT_SAVED = {
    "cam_baseline": {"net", "optimizer", "scheduler"},
    "magsd": {"net", "optimizer", "scheduler"},
    "nonlocal_unet": {"net", "optimizer", "scheduler"},
    "pcam": {"net"},
    "retinanet": {"net"},
    "oxnet": {"net"},
    "dcmt": {"net"},
    "dcmt_subject": {"net"},
}


def _constructor_arguments(cls: type) -> set[str]:
    """The arguments ``cls`` takes: its own, and MedAttnModule's when it forwards ``**kwargs`` to it."""
    parameters = inspect.signature(cls).parameters
    names = {n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        names |= set(inspect.signature(MedAttnModule).parameters)
    return names


def test_every_registered_method_is_pinned():
    assert set(NOT_SAVED) == set(METHODS)


@pytest.mark.parametrize("name", method_names())
def test_hyperparameters_are_the_constructor_arguments_but_the_injected_objects(name, tmp_path):
    module, _ = build(name, tmp_path / name)
    accepted = _constructor_arguments(type(module))
    assert set(module.hparams) == accepted - NOT_SAVED[name], name
    if "optimizer" in module.hparams and name != "nonlocal_unet":
        assert module.hparams["optimizer"] is default_optimizer  # the value itself, not a placeholder
    if "channels_last" in accepted:
        assert module.hparams["channels_last"] is False


def test_a_subclass_of_a_method_records_its_own_and_the_method_arguments(tmp_path):
    """The whole ``__init__`` chain is collected: a subclass adds its arguments to its method's."""
    module, _ = build("pcam", tmp_path / "pcam")
    pcam = type(module)

    class Tuned(pcam):
        def __init__(self, net, extra: int = 3, **kwargs) -> None:
            super().__init__(net, **kwargs)

    tuned = Tuned(module.net, extra=5, cam_threshold=0.25)
    assert tuned.hparams["extra"] == 5 and tuned.hparams["cam_threshold"] == 0.25
    assert set(tuned.hparams) == set(module.hparams) | {"extra"}


def test_a_python_built_oxnet_checkpoint_loads_its_distillation_settings_as_data(tmp_path):
    """The ``Distillation`` object in a Python-built module's hyper-parameters is allow-listed for ``weights_only``
    loading, so ``load_from_checkpoint`` restores it (with the network passed: Python objects are not saved)."""
    import lightning
    import torch

    from callbacks.checkpoint_io import load_checkpoint_file
    from lightning_modules.oxnet import OXnetModule
    from networks.oxnet import Distillation, OXnet
    from networks.retina import RetinaNet

    def net():
        return OXnet(RetinaNet(num_classes=2, backbone="test_resnet", fpn_levels=(3, 4, 5), fpn_channels=16,
                               head_depth=1))

    module = OXnetModule(net(), distillation=Distillation(unlabeled_score_thresh=0.7))
    path = tmp_path / "python_built.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                "pytorch-lightning_version": lightning.__version__}, path)
    assert load_checkpoint_file(path)["hyper_parameters"]["distillation"] == module.distillation
    assert OXnetModule.load_from_checkpoint(path, net=net()).distillation.unlabeled_score_thresh == 0.7
