"""Experiment trackers (``train.report_to``) through accelerate: TensorBoard, W&B, Trackio,
MLflow, Comet. prefopt names them as TRL does and checks each is installed before the run;
accelerate does the logging (main process only). ``metrics.jsonl`` is written either way."""
from __future__ import annotations

from pathlib import Path

from prefopt.errors import ConfigError, unknown

PACKAGES = {"tensorboard": ("is_tensorboard_available", "tensorboard"), "wandb": ("is_wandb_available", "wandb"),
            "trackio": ("is_trackio_available", "trackio"), "mlflow": ("is_mlflow_available", "mlflow"),
            "comet_ml": ("is_comet_ml_available", "comet_ml")}


def resolve_trackers(report_to: list) -> list[str]:
    """Checked tracker names; 'none' means none, 'all' every installed one."""
    import accelerate.utils as au

    names = [str(n).lower() for n in report_to]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return [n for n, (check, _) in PACKAGES.items() if getattr(au, check)()]
    for name in names:
        if name not in PACKAGES:
            raise ConfigError("train.report_to: " + unknown("tracker", name, list(PACKAGES) + ["none", "all"]))
        check, package = PACKAGES[name]
        if not getattr(au, check)():
            raise ConfigError(f"train.report_to: {name} needs the {package} package (pip install {package})")
    return names


def flat_config(data, prefix: str = "") -> dict:
    """The run config as flat scalars (what TensorBoard's hparams and every tracker accept)."""
    out = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flat_config(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list):
        return {prefix[:-1]: str(data)}
    return {prefix[:-1]: data if isinstance(data, (int, float, str, bool)) else str(data)}


def logging_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "logs"
