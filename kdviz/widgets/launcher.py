"""Fine-tune launcher: pick an objective and its settings, watch hard/easy loss parts live, compare runs."""

from __future__ import annotations

import ipywidgets as w
import plotly.graph_objects as go
import polars as pl
from transformers import TrainerCallback

from kdviz.train import LOSSES, DistillResult, distill
from kdviz.widgets.tables import html_table


class LiveCurves(TrainerCallback):
    """Appends each logged step's KD hard/easy parts to two traces of a FigureWidget."""

    def __init__(self, figure: go.FigureWidget, label: str):
        self.figure, self.label = figure, label
        self.hard = len(figure.data)
        figure.add_scatter(name=f"{label} hard", x=[], y=[], mode="lines")
        figure.add_scatter(name=f"{label} easy", x=[], y=[], mode="lines", line=dict(dash="dot"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "kd_hard" in logs:
            with self.figure.batch_update():
                for trace, key in ((self.figure.data[self.hard], "kd_hard"), (self.figure.data[self.hard + 1],
                                                                               "kd_easy")):
                    trace.x = (*trace.x, state.global_step)
                    trace.y = (*trace.y, logs[key])


class DistillLauncher:
    """Widgets for objective, lam, k, steps and teacher; a Run button; live curves; a table of runs.

    Every run goes through `kdviz.train.distill`; `run()` does what the button does (for scripts
    and papermill).
    """

    def __init__(self, *, teachers: list[str], student: str, data, steps: int = 60, limit: int | None = None,
                 **distill_options):
        self.student, self.data, self.limit, self.options = student, data, limit, distill_options
        self.loss = w.Dropdown(options=list(LOSSES), value="atkd", description="objective")
        self.lam = w.FloatSlider(value=0.2, min=0.0, max=1.0, step=0.05, description="lam (ATKD)")
        self.k = w.FloatSlider(value=0.5, min=0.05, max=1.0, step=0.05, description="k (ATKD)")
        self.steps = w.IntSlider(value=steps, min=1, max=max(1000, steps), step=1, description="steps")
        self.teacher = w.Dropdown(options=teachers, value=teachers[-1], description="teacher")
        self.button = w.Button(description="Run", icon="play", button_style="primary")
        self.status = w.HTML()
        self.curves = go.FigureWidget(layout=dict(height=320, title="KD loss parts while training",
                                                  xaxis_title="step", yaxis_title="part of the KD loss",
                                                  margin=dict(t=40, l=50, r=10, b=40)))
        self.table_view = w.HTML()
        self.results: list[DistillResult] = []
        self.button.on_click(lambda _: self.run())
        self.loss.observe(lambda _: self._sync_controls(), "value")
        self._sync_controls()

    def _sync_controls(self) -> None:
        atkd = self.loss.value == "atkd"
        self.lam.disabled = self.k.disabled = not atkd

    def settings(self) -> dict:
        """What the Run button would launch now."""
        params = {"lam": self.lam.value, "k": self.k.value} if self.loss.value == "atkd" else {}
        return {"loss": self.loss.value, "teacher": self.teacher.value, "steps": self.steps.value,
                "loss_params": params}

    def run(self) -> DistillResult:
        s = self.settings()
        label = f"#{len(self.results) + 1} {s['loss']}"
        self.button.disabled = True
        self.status.value = f"running {label} from {s['teacher']} for {s['steps']} steps ..."
        try:
            result = distill(s["teacher"], self.student, self.data, loss=s["loss"], steps=s["steps"],
                             limit=self.limit, loss_params=s["loss_params"],
                             callbacks=[LiveCurves(self.curves, label)], progress=False, **self.options)
        finally:
            self.button.disabled = False
        self.results.append(result)
        self.status.value = f"{label} done in {result.train_seconds:.0f} s"
        self.table_view.value = html_table(self.table())
        return result

    def table(self) -> pl.DataFrame:
        """One row per run: settings and held-out metrics."""
        return pl.DataFrame([{"run": i + 1, **r.row(), **{f"param_{k}": v for k, v in r.settings["loss_params"].items()
                                                           if k in ("lam", "k")}}
                             for i, r in enumerate(self.results)])

    def widget(self) -> w.Widget:
        controls = w.VBox([w.HBox([self.loss, self.teacher]), w.HBox([self.lam, self.k]), self.steps,
                           w.HBox([self.button, self.status])])
        return w.VBox([controls, self.curves, self.table_view])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget())
