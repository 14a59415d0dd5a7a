"""Fine-tune launcher: pick an objective and its settings, watch hard/easy loss parts live, compare runs."""

from __future__ import annotations

import time
from contextlib import contextmanager

import ipywidgets as w
import plotly.graph_objects as go
import polars as pl
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from kdviz.comparison import Comparison, compare
from kdviz.train import LOSSES, DistillResult, distill
from kdviz.widgets.runs import RunComparison
from kdviz.widgets.style import WIDE
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


class TrainingProgress(TrainerCallback):
    """A progress bar and one line of text (phase, step, loss, time left) that a fine-tune updates.

    Writes only to its widgets, never to stdout/stderr (which JupyterLab sends to its Log Console
    when a button started the run).
    """

    def __init__(self, *, clock=time.perf_counter):
        self.clock = clock
        self.bar = w.IntProgress(value=0, min=0, max=1, layout={"width": "320px"})
        self.text = w.HTML()
        self.bar.add_class("kdviz-progress")
        self.text.add_class("kdviz-progress-text")
        self.loss: float | None = None

    def start(self, message: str) -> None:
        self.bar.value, self.bar.bar_style, self.loss = 0, "info", None
        self.text.value = message

    def finish(self, message: str, *, failed: bool = False) -> None:
        self.bar.bar_style = "danger" if failed else "success"
        self.text.value = message

    def on_init_end(self, args, state, control, **kwargs):
        self.text.value = "models and data loaded; scoring the student before training ..."

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar.max, self.bar.value = state.max_steps, 0
        self.started = self.clock()
        self._show(state)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.value = state.global_step
        self._show(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]
            self._show(state)

    def on_train_end(self, args, state, control, **kwargs):
        self.text.value = f"step {state.global_step}/{state.max_steps}; scoring the student after training ..."

    def _show(self, state) -> None:
        step, total = state.global_step, state.max_steps
        loss = "" if self.loss is None else f" &middot; loss {self.loss:.3f}"
        left = ""
        if step:
            left = f" &middot; {duration((self.clock() - self.started) / step * (total - step))} left"
        self.text.value = f"step {step}/{total}{loss}{left}"


@contextmanager
def no_loading_bars():
    """Hide transformers' "Loading weights" bars for a while (the launcher shows its own progress)."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def duration(seconds: float) -> str:
    """'<1 s', '42 s' or '3 min 05 s'."""
    if seconds < 1:
        return "<1 s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


class DistillLauncher:
    """Widgets for objective, lam, k, steps and teacher; a Run button; progress; live curves; a table of runs.

    Every run goes through `kdviz.train.distill`; `run()` does what the button does (for scripts
    and papermill). A run started by the button writes anything printed or raised to `log`, an
    output area under the table, instead of JupyterLab's Log Console.
    """

    def __init__(self, *, teachers: list[str], student: str, data, steps: int = 60, limit: int | None = None,
                 **distill_options):
        self.student, self.data, self.limit, self.options = student, data, limit, distill_options
        self.loss = w.Dropdown(options=list(LOSSES), value="atkd", description="objective", style=WIDE)
        self.lam = w.FloatSlider(value=0.2, min=0.0, max=1.0, step=0.05, description="lam (ATKD)", style=WIDE)
        self.k = w.FloatSlider(value=0.5, min=0.05, max=1.0, step=0.05, description="k (ATKD)", style=WIDE)
        self.steps = w.IntSlider(value=steps, min=1, max=max(1000, steps), step=1, description="steps", style=WIDE)
        self.teacher = w.Dropdown(options=teachers, value=teachers[-1], description="teacher", style=WIDE)
        self.button = w.Button(description="Run", icon="play", button_style="primary")
        self.progress = TrainingProgress()
        self.log = w.Output()
        self.curves = go.FigureWidget(layout=dict(height=320, title="KD loss parts while training",
                                                  xaxis_title="step", yaxis_title="part of the KD loss",
                                                  margin=dict(t=40, l=50, r=10, b=40)))
        self.table_view = w.HTML()
        self.table_view.add_class("kdviz-runs")
        self.tokens_view = w.VBox()  # what the runs did to each probe token (kdviz.compare), after each run
        self.results: list[DistillResult] = []
        self.button.on_click(lambda _: self._run_from_button())
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
        self.progress.start(f"{label}: loading {s['teacher']} and the student ...")
        try:
            with no_loading_bars():
                result = distill(s["teacher"], self.student, self.data, loss=s["loss"], steps=s["steps"],
                                 limit=self.limit, loss_params=s["loss_params"], probe_every=max(1, s["steps"] // 5),
                                 callbacks=[LiveCurves(self.curves, label), self.progress], progress=False,
                                 **self.options)
        except Exception as error:
            self.progress.finish(f"{label} failed: {type(error).__name__} (details below)", failed=True)
            raise
        finally:
            self.button.disabled = False
        self.results.append(result)
        self.progress.finish(f"{label} done: {s['steps']} steps in {result.train_seconds:.0f} s; "
                             f"held-out loss {result.before.loss:.3f} &rarr; {result.after.loss:.3f}")
        self.table_view.value = html_table(self.table())
        self.comparison = self.compare()
        self.tokens_view.children = [RunComparison(self.comparison).widget()]
        return result

    def compare(self) -> Comparison:
        """The runs launched so far, token by token on their probe set (the held-out examples)."""
        return compare(*self.results, labels=[f"{i + 1} {r.loss}" for i, r in enumerate(self.results)])

    def _run_from_button(self) -> None:
        with self.log:  # anything printed or raised lands in the notebook, not in the Log Console
            self.run()

    def table(self) -> pl.DataFrame:
        """One row per run: settings and held-out metrics."""
        return pl.DataFrame([{"run": i + 1, **r.row(), **{f"param_{k}": v for k, v in r.settings["loss_params"].items()
                                                           if k in ("lam", "k")}}
                             for i, r in enumerate(self.results)])

    def widget(self) -> w.Widget:
        controls = w.VBox([w.HBox([self.loss, self.teacher]), w.HBox([self.lam, self.k]), self.steps,
                           w.HBox([self.button, self.progress.bar, self.progress.text])])
        return w.VBox([controls, self.curves, self.table_view, self.tokens_view, self.log])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget())
