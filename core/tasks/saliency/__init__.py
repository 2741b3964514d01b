"""Saliency: attribution methods (``methods``), attention capture (``attention``),
per-map figures (``metrics``) and the pipeline task (``task``)."""

from visbatch.core.tasks.saliency.methods import METHODS, Attribution, LayerAccess
from visbatch.core.tasks.saliency.task import SaliencyOptions, SaliencyTask

__all__ = ["METHODS", "Attribution", "LayerAccess", "SaliencyOptions", "SaliencyTask"]
