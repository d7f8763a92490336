"""The contract every method family implements, and the registry of methods by id.

A method is a :class:`~napari_spatialssl.training.TrainingTask` for its pretraining (the Trainer
trains it), plus what comes after: downstream evaluation (which may train further stages with
the same Trainer) and the results written back to AnnData under the documented keys:

- ``obsm['X_<method>']``: per-cell embeddings;
- ``layers['<method>_reconstruction']``: reconstructed expression (model genes, zero elsewhere);
- ``obs['<method>_domain']`` and ``obs['<method>_cell_type']``: categoricals;
- ``obs['<method>_masked']``: cells masked in the evaluation mask;
- ``uns['spatialssl'][<method>]``: config, metrics, versions.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..config import DataConfig, TrainConfig
from ..data.dataset import SpatialDataset


@dataclass
class MethodResults:
    """What a method puts back on the slide; keys follow the module docstring's convention."""

    obsm: dict[str, np.ndarray] = field(default_factory=dict)
    layers: dict[str, Any] = field(default_factory=dict)
    obs: dict[str, Any] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


class SSLMethod(abc.ABC):
    """Base class of the three method families (gnn-mask, spotscape, patch-mae).

    Besides training, a method describes how it views the slide, so that previews, preflight
    checks and the widget never guess from config field names:

    - ``view_kind``: "graph" (a neighbour graph per section: :meth:`preview_graph`,
      :meth:`graph_radius`, :meth:`view_hops`) or "patches" (a lattice cut into patches:
      :meth:`bin_size_for`, :meth:`patch_shape`);
    - ``mask_kind``: what its pretext mask hides: "cells" (whole cells, chosen by ``config.mask``),
      "genes" (gene channels of every cell) or "regions" (bins of the lattice).
    """

    name: str = ""
    config_class: type = TrainConfig
    view_kind: str = "graph"
    mask_kind: str = "cells"

    def __init__(self, config=None):
        self.config = config if config is not None else self.config_class()
        self.model: torch.nn.Module | None = None
        self.data: SpatialDataset | None = None

    # -- pretraining: the TrainingTask interface ------------------------------------------
    @abc.abstractmethod
    def prepare(self, data: SpatialDataset) -> None:
        """Build the view(s) of the slide and the model. Called once, before training."""

    @abc.abstractmethod
    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterable[Any]:
        ...

    @abc.abstractmethod
    def training_loss(self, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        ...

    def validation_loss(self, device: torch.device) -> float | None:
        return None

    def on_epoch_start(self, epoch: int, device: torch.device) -> None:
        return None

    # -- after pretraining ----------------------------------------------------------------
    @abc.abstractmethod
    def evaluate(self, data: SpatialDataset, device: torch.device,
                 make_trainer: Callable[[TrainConfig], Any]) -> MethodResults:
        """Downstream tasks and metrics on `data`; any extra training uses `make_trainer(train_config,
        stage="<what it trains>")`, whose Trainer the pipeline can stop and whose progress it reports."""

    @abc.abstractmethod
    def predict(self, data: SpatialDataset, device: torch.device) -> MethodResults:
        """Apply the trained model to a (new) slide without any training."""

    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """The model from ``self.config`` and the extra state alone (no data needed), untrained."""

    def extra_state(self) -> dict:
        """State beyond the weights saved in the checkpoint (JSON-able or tensors).

        Subclasses extend it; 'genes' (the model's input genes, in order) is required by `predict`.
        """
        return {"genes": [str(g) for g in self.data.gene_names]} if self.data is not None else {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` saved (before `build_model` is called for prediction)."""
        self.genes = list(state.get("genes", []))

    # -- how the method views the slide (see the class docstring) ----------------------------
    def graph_radius(self, data: SpatialDataset) -> tuple[float, str]:
        """(radius in the coordinates' units, how it was chosen) of the graph the method builds."""
        raise NotImplementedError(f"{self.name} does not view the slide as a radius graph")

    def preview_graph(self, data: SpatialDataset):
        """The neighbour graph the method trains on, from coordinates and sections alone (a
        geometry-only dataset is enough: see preflight.geometry_dataset)."""
        raise NotImplementedError(f"{self.name} does not view the slide as a graph")

    def view_hops(self) -> int:
        """Graph hops that one cell's output depends on (its ego-net in the previews)."""
        raise NotImplementedError(f"{self.name} does not view the slide as a graph")

    def bin_size_for(self, data: SpatialDataset) -> float:
        """Lattice bin side (coordinate units) for a slide: the configured one or the rule's."""
        raise NotImplementedError(f"{self.name} does not view the slide as patches")

    def patch_shape(self) -> tuple[int, int]:
        """(h, w) bins of one patch."""
        raise NotImplementedError(f"{self.name} does not view the slide as patches")

    def load_state_dict_for_predict(self, state_dict: dict) -> None:
        self.model = self.build_model()
        self.model.load_state_dict(state_dict)
        self.model.eval()


METHODS: dict[str, type[SSLMethod]] = {}


def register(cls: type[SSLMethod]) -> type[SSLMethod]:
    METHODS[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[SSLMethod]:
    from . import _load_all  # noqa: F401  (registers the built-in methods)

    _load_all()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}.")
    return METHODS[name]


def data_config_of(config) -> DataConfig:
    return getattr(config, "data", DataConfig())
