"""lmdistill: knowledge distillation for causal language models.

from lmdistill import Config, train
result = train(Config.load("configs/default.yaml", ["train.max_steps=50"]))
"""

from lmdistill.config import Config
from lmdistill.core.errors import LmdistillError
from lmdistill.loss.dense import distillation_loss, token_divergence

__version__ = "0.1.0"


def train(cfg, **kwargs):
    """Run a distillation; see ``lmdistill.training.trainer.train``.

    ``cfg`` is a ``Config``, or the path of a YAML config file (loaded with ``Config.load``).
    An empty ``model.teacher`` is the embedded default teacher, built (once) before the run.
    """
    import os

    if isinstance(cfg, (str, os.PathLike)):
        cfg = Config.load(cfg)
    elif not isinstance(cfg, Config):
        raise TypeError(
            f"lmdistill.train expects a Config or the path of a YAML config file, got "
            f"{type(cfg).__name__}; e.g. train(Config.load('configs/default.yaml', "
            "['train.max_steps=50']))"
        )
    from lmdistill.default import resolve_default_teacher
    from lmdistill.training.devices import check_precision
    from lmdistill.training.setup import preflight
    from lmdistill.training.trainer import train as _train

    if kwargs.get("teacher") is None:
        preflight(cfg)  # a bad config or output directory is refused before the teacher is built
        check_precision(cfg)  # and fp16 on a machine without CUDA
        resolve_default_teacher(cfg, progress=kwargs.get("progress", True))
    return _train(cfg, **kwargs)


__all__ = ["Config", "LmdistillError", "distillation_loss", "token_divergence", "train", "__version__"]
