"""Train panel: the run's settings, every stage it will train, Train / Stop, progress, live loss, models."""

from __future__ import annotations

import time

from qtpy.QtWidgets import QFileDialog, QProgressBar, QSpinBox, QStackedWidget, QVBoxLayout, QWidget

from ...config import panel_settings
from ..figures import loss_figure
from ..forms import SettingsForm
from ..plots import FigureView
from ..progress import planned_stages
from .common import button, label, row

PROGRESS_MAX = 1000


class TrainForm(QWidget):
    def __init__(self, session, method: str, parent=None):
        super().__init__(parent)
        self.session, self.method = session, method
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.form = SettingsForm(panel_settings(session.config(method), "train")[0], self._edit)
        lay.addWidget(self.form)

    def _edit(self, name, value) -> None:
        self.session.guarded(self.session.set_setting, name, value, self.method)
        self.form.show_values(self.session.config(self.method))


class TrainPanel(QWidget):
    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        lay = QVBoxLayout(self)
        self.stack = QStackedWidget()
        self.forms = {m: TrainForm(session, m) for m in session.methods}
        for m in session.methods:
            self.stack.addWidget(self.forms[m])
        lay.addWidget(self.stack)
        self.devices = QSpinBox()
        self.devices.setRange(1, session.max_devices())
        self.devices.setValue(session.devices)
        self.devices.setToolTip("Training processes (data-parallel, torch.distributed): one per GPU; without "
                                "GPUs, processes sharing the CPU cores. The CLI's fit --devices N.")
        self.devices.valueChanged.connect(lambda n: session.guarded(session.set_devices, int(n)))
        lay.addWidget(row(label("Processes"), self.devices))
        self.plan = label("", "The trainings this run does, each with its own epoch count.")
        lay.addWidget(self.plan)
        self.train_button = button("Train", lambda: session.guarded(session.train),
                                   "Pretrain the method on the slide in the background, then evaluate it.")
        self.stop_button = button("Stop", session.stop, "Stop at the next step; the model keeps what it learned.")
        self.stop_button.setEnabled(False)
        lay.addWidget(row(self.train_button, self.stop_button))
        self.bar = QProgressBar()
        self.bar.setRange(0, PROGRESS_MAX)
        lay.addWidget(self.bar)
        self.progress = label("")
        lay.addWidget(self.progress)
        self.loss = FigureView(150)
        self.steps: list[float] = []
        self.epochs: list[tuple] = []
        self._drawn = 0.0
        lay.addWidget(self.loss)
        self.save_button = button("Save model…", self._save, "Write the trained model and its results as a run "
                                  "folder (model.safetensors, model.json, result.h5ad, manifest.json).")
        self.load_button = button("Load model and predict…", self._load, "Apply a model saved by 'fit' or this "
                                  "widget to the slide (nothing in the folder is executed).")
        lay.addWidget(row(self.save_button, self.load_button))
        lay.addStretch(1)
        ev = session.events
        ev.method.connect(self._method)
        ev.settings.connect(lambda *_: self._render())
        ev.job.connect(self._job)
        ev.progress.connect(self._progress)
        ev.results.connect(lambda *_: self._render())
        ev.figure.connect(lambda name, fig: self.loss.show_figure(fig) if name == "loss" else None)
        self._method(session.method)

    def _method(self, method: str) -> None:
        self.stack.setCurrentWidget(self.forms[method])
        self.forms[method].form.show_values(self.session.config(method))
        self._render()

    def _render(self) -> None:
        cfg = self.session.config()
        if self.devices.value() != self.session.devices:  # set elsewhere (the Python console, a test)
            self.devices.blockSignals(True)
            self.devices.setValue(self.session.devices)
            self.devices.blockSignals(False)
        where = f" (pretraining on {self.session.devices} processes)" if self.session.devices > 1 else ""
        self.plan.setText("This run: " + "; then ".join(planned_stages(cfg)) + where + ".")
        result = self.session.results.get(self.session.method)
        self.save_button.setEnabled(result is not None and result.source == "trained" and self.session.job.kind == "idle")

    def _job(self, job) -> None:
        busy = job.kind != "idle"
        self.train_button.setEnabled(not busy)
        self.devices.setEnabled(not busy)
        self.load_button.setEnabled(not busy)
        self.stop_button.setEnabled(job.kind == "training")
        if job.kind == "training":
            self.steps, self.epochs = [], []
            self.bar.setValue(0)
        if not busy and (self.steps or self.epochs):
            self._draw_loss()
        self._render()

    def _progress(self, p) -> None:
        self.progress.setText(p.text)
        if p.fraction is not None:
            self.bar.setValue(int(PROGRESS_MAX * p.fraction))
        if p.step_loss is not None:
            self.steps.append(p.step_loss)
        if p.epoch_loss is not None:
            self.epochs.append((float(max(len(self.steps), len(self.epochs) + 1)), p.epoch_loss, p.val_loss))
        if p.epoch_loss is not None or time.perf_counter() - self._drawn > 1.0:
            self._draw_loss()

    def _draw_loss(self) -> None:
        """The loss curve, drawn off the main thread (at most once per epoch or second)."""
        self._drawn = time.perf_counter()
        self.session.draw("loss", loss_figure, list(self.steps), list(self.epochs))

    def _save(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "An empty folder for the model and its results")
        if path:
            self.session.guarded(self.session.save_model, path)

    def _load(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder of a saved model (model.safetensors + model.json)")
        if path:
            self.session.guarded(self.session.load_model, path)
