"""Values the data knows reach the model through the CLI's links (``experiments/cli.py``, ``DATA_LINKS``): no
shipped YAML states a class count, input channels, spatial dims or the sliding-window ROI, and a config that
forces a value the data contradicts is refused with one error naming the argument and the data's value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from experiments.cli import ConfigLinkError, MedAttnCLI

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
LINKED = ("num_classes", "in_chans", "in_channels", "spatial_dims", "in_features")


def _cli(config: str, *flags: str, tmp_path: Path) -> MedAttnCLI:
    """The experiment built (not run), without a logger, its data cached under tmp_path."""
    return MedAttnCLI(args=["-c", str(EXPERIMENTS / config), "--trainer.logger", "false",
                            "--trainer.callbacks", "[]", *flags], run=False)


def _cxr(tmp_path: Path, n: int = 40) -> list[str]:
    return ["--data.init_args.reader.init_args.n_images", str(n), "--data.init_args.reader.init_args.cache_dir",
            str(tmp_path), "--data.init_args.num_workers", "0"]


def _model_keys(node, found: set[str]) -> set[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            found.add(key)
            _model_keys(value, found)
    elif isinstance(node, list):
        for value in node:
            _model_keys(value, found)
    return found


@pytest.mark.parametrize("path", sorted(p for p in EXPERIMENTS.rglob("*.yaml") if "sweeps" not in p.parts),
                         ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_no_yaml_repeats_a_linked_value(path):
    model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    assert not _model_keys(model, set()) & set(LINKED), f"{path}: linked from the data, leave it out"


def test_a_three_class_reader_gives_a_three_class_network(tmp_path):
    classes = ["Nodule", "Mass", "Effusion"]
    cli = _cli("pcam/synthetic.yaml", *_cxr(tmp_path), "--data.init_args.reader.init_args.classes",
               str(classes), tmp_path=tmp_path)
    assert cli.datamodule.num_classes == 3
    assert cli.model.net.num_classes == 3
    with torch.no_grad():
        assert cli.model.eval()(torch.zeros(1, 1, 64, 64)).shape[-1] == 3  # three outputs, not the YAML's old 4
    assert cli.model.class_names == classes
    # a link whose target this module lacks leaves no trace in its hyper-parameters (they are what a checkpoint
    # rebuilds the module from; jsonargparse reports such a link as applied)
    assert list(cli.model.hparams["class_names"]) == classes
    assert not {"roi_size", "in_channels", "spatial_dims"} & set(cli.model.hparams)
    # the network's config is kept (load_from_checkpoint rebuilds it) with the linked values it takes, and only those
    net = cli.model.hparams["net"]["init_args"]
    assert (net["num_classes"], net["in_chans"]) == (3, 1) and not {"in_channels", "spatial_dims"} & set(net)


def test_volumes_give_channels_dims_classes_and_roi(tmp_path):
    cli = _cli("nonlocal_unet/synthetic.yaml", "--data.init_args.reader.init_args.cache_dir", str(tmp_path),
               "--data.init_args.patch_size", "16", tmp_path=tmp_path)
    net = cli.model.net
    assert (net.spatial_dims, net.in_channels, net.num_classes) == (3, 2, 4)  # two modalities, iSeg classes
    assert list(cli.model.hparams.class_names) == ["background", "CSF", "GM", "WM"]
    assert tuple(cli.model.inferers["test"].roi_size) == (16, 16, 16)  # the ROI follows data.patch_size


def test_oxnet_nested_retinanet_gets_the_class_count(tmp_path):
    cli = _cli("oxnet/synthetic.yaml", *_cxr(tmp_path), "--data.init_args.reader.init_args.classes",
               "[Nodule, Mass]", tmp_path=tmp_path)
    assert cli.model.student.num_classes == 2


def test_a_forced_contradicting_value_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigLinkError) as err:
        _cli("pcam/synthetic.yaml", *_cxr(tmp_path), "--model.init_args.net.init_args.num_classes", "3",
             tmp_path=tmp_path)
    message = str(err.value)
    assert "--model.init_args.net.init_args.num_classes=3" in message and "num_classes is 4" in message
    assert "\n" not in message
    # the same value as the data is accepted (configs written before the link still run)
    cli = _cli("pcam/synthetic.yaml", *_cxr(tmp_path), "--model.init_args.net.init_args.num_classes", "4",
               tmp_path=tmp_path)
    assert cli.model.net.num_classes == 4


def test_setup_check_without_the_cli_names_both_counts(tmp_path):
    """A network built in Python with the wrong count fails in setup with the shared message."""
    import lightning.pytorch as pl

    from lightning_modules.registry import METHODS

    module, data = METHODS["pcam"].tiny(tmp_path)
    from lightning_modules.pcam import PCAMModule
    from networks.cam_heads import PoolingClassifier

    wrong = PCAMModule(PoolingClassifier("test_resnet", num_classes=data.num_classes + 1))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=rf"has {data.num_classes + 1} outputs but the data .* has "
                                         rf"{data.num_classes} classes"):
        trainer.fit(wrong, data)


def _printed(configs: list[str], capsys) -> dict:
    from experiments.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["fit", *(a for c in configs for a in ("-c", str(EXPERIMENTS / c))), "--print_config"])
    assert stop.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("dataset", ["synthetic", "nih", "chexpert"])
@pytest.mark.parametrize("variant, pool", [("avg", {"pool": "avg"}), ("lse", {"pool": "lse", "pool_kwargs": {"gamma": 0.5}})])
def test_pooling_overlay_changes_only_the_pooling_and_the_run_name(dataset, variant, pool, capsys):
    """``-c pcam/<dataset>.yaml -c pcam/<variant>.yaml`` is the base config with another pooling: every other
    value (network, loss, data, schedule, callbacks, logger group and tags) is the base's."""
    base = _printed([f"pcam/{dataset}.yaml"], capsys)
    composed = _printed([f"pcam/{dataset}.yaml", f"pcam/{variant}.yaml"], capsys)
    net = composed["model"]["init_args"]["net"]["init_args"]
    assert {k: net[k] for k in pool} == pool
    assert composed["trainer"]["logger"]["init_args"]["name"] == f"pcam_{variant}"
    base_logger, logger = base["trainer"]["logger"]["init_args"], composed["trainer"]["logger"]["init_args"]
    assert {k: v for k, v in logger.items() if k != "name"} == {k: v for k, v in base_logger.items() if k != "name"}
    for key in pool:
        base["model"]["init_args"]["net"]["init_args"][key] = net[key]
    base["trainer"]["logger"]["init_args"]["name"] = logger["name"]
    assert composed == base


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "covid-cxr-mini" / "metadata.csv").is_file(),
                    reason=f"the covid-cxr-mini sample is not at {SHARED} (the repository's ../shared/data)")
def test_shipped_data_configs_work_from_any_directory(tmp_path, monkeypatch):
    """``root: ${MEDATTN_DATA}/covid-cxr-mini`` resolves against the repository, not the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDATTN_DATA", raising=False)
    cli = MedAttnCLI(args=["-c", str(ROOT / "experiments/magsd/covid_cxr.yaml"), "--trainer.logger", "false",
                           "--trainer.callbacks", "[]"], run=False)
    assert cli.datamodule.num_classes == 2  # metadata.csv was read (the link needs it)
    assert Path(cli.datamodule.reader.root).resolve() == (SHARED / "covid-cxr-mini").resolve()


def test_medattn_data_moves_every_data_root(tmp_path, monkeypatch):
    from jsonargparse import Namespace

    from experiments.cli import expand_data_root

    monkeypatch.setenv("MEDATTN_DATA", str(tmp_path / "elsewhere"))
    config = Namespace(data=Namespace(init_args=Namespace(root="${MEDATTN_DATA}/covid-cxr-mini", other="x")))
    expand_data_root(config)
    assert config.data.init_args.root == str(tmp_path / "elsewhere" / "covid-cxr-mini")
    assert config.data.init_args.other == "x"
    shipped = [p for p in EXPERIMENTS.rglob("*.yaml") if "shared/data" in
               "\n".join(line for line in p.read_text().splitlines() if not line.lstrip().startswith("#"))]
    assert not shipped, f"configs naming ../shared/data directly (use ${{MEDATTN_DATA}}): {shipped}"


def test_subject_aggregator_takes_its_input_size_from_the_feature_file(tmp_path):
    from lightning_modules.tiny import write_tiny_features

    features = tmp_path / "slice_features.npz"
    write_tiny_features(features, n_subjects=30, dim=24)
    cli = _cli("dcmt_subject/synthetic.yaml", "--data.init_args.features_file", str(features), tmp_path=tmp_path)
    assert cli.datamodule.num_features == 24
    assert cli.model.student.in_features == 24 and cli.model.student.num_classes == cli.datamodule.num_classes
