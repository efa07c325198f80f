"""Experiment trackers (``train.report_to``) through accelerate: TensorBoard, W&B, Trackio,
MLflow, Comet. prefopt names them as TRL does and checks each is installed before the run;
accelerate does the logging (main process only). ``metrics.jsonl`` is written either way."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from prefopt.errors import ConfigError, unknown

log = logging.getLogger("prefopt")

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


def tracker_init_kwargs(names: list[str], output_dir: Path) -> dict:
    """Keep every tracker's files under ``OUTPUT_DIR/logs`` and make runs work with no network.

    - wandb: files under logs/; with no API key (``WANDB_API_KEY`` or a ``~/.netrc`` entry) and
      no ``WANDB_MODE`` set, the run is logged offline (``wandb sync`` uploads it later) instead
      of stopping at a login prompt.
    - mlflow: with no ``MLFLOW_TRACKING_URI`` set, a store under logs/ instead of mlflow's
      default database in the current directory: ``logs/mlflow.db`` where mlflow's database
      store is installed (full mlflow), else the file store ``logs/mlruns`` (mlflow-skinny).
    - trackio and TensorBoard are local already (TensorBoard writes under logs/ through accelerate).
    Returns accelerate's ``init_kwargs``; settings the user made are never overridden."""
    logs = logging_dir(output_dir).resolve()
    kwargs: dict = {}
    if "wandb" in names:
        kwargs["wandb"] = {"dir": str(logs)}
        logs.mkdir(parents=True, exist_ok=True)
        if not os.environ.get("WANDB_MODE") and not _wandb_key_known():
            os.environ["WANDB_MODE"] = "offline"
            log.info("wandb: no API key found, logging offline under %s (upload later with `wandb sync`)", logs)
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        import importlib.util

        import mlflow

        logs.mkdir(parents=True, exist_ok=True)
        if importlib.util.find_spec("sqlalchemy") and importlib.util.find_spec("alembic"):
            uri = f"sqlite:///{logs / 'mlflow.db'}"
        else:
            uri = (logs / "mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        log.info("mlflow: no MLFLOW_TRACKING_URI set, logging to %s", uri)
    return kwargs


def _wandb_key_known() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
