"""lmdistill: knowledge distillation for causal language models.

    from lmdistill import Config, train
    result = train(Config.load("configs/default.yaml", ["train.max_steps=50"]))
"""

from .config import Config
from .errors import LmdistillError
from .losses import distillation_loss, token_divergence

__version__ = "0.1.0"


def train(cfg, **kwargs):
    """Run a distillation; see ``lmdistill.trainer.train``.

    An empty ``model.teacher`` is the embedded default teacher, built (once) before the run.
    """
    from .default import resolve_default_teacher
    from .trainer import preflight
    from .trainer import train as _train

    if kwargs.get("teacher") is None:
        preflight(cfg)  # a bad config or output directory is refused before the teacher is built
        resolve_default_teacher(cfg, progress=kwargs.get("progress", True))
    return _train(cfg, **kwargs)


__all__ = ["Config", "LmdistillError", "distillation_loss", "token_divergence", "train", "__version__"]
