"""Workshop view: toy teacher/student distributions with sliders; TKD, DKD and KL move live."""

from __future__ import annotations

import ipywidgets as w
import plotly.graph_objects as go

from kdviz.toy import ToyResult, toy_kd


class ToyKD:
    """Sliders for temperature, target probabilities and tail spreads; a bar chart and a readout.

    >>> toy = ToyKD()
    >>> toy.teacher_target.value = 0.95
    >>> toy.result.unc < 0.06
    True
    """

    def __init__(self, *, vocab: int = 8):
        self.vocab = vocab

        def slider(description, value, low, high, step=0.01):
            return w.FloatSlider(value=value, min=low, max=high, step=step, description=description,
                                 style={"description_width": "140px"}, layout={"width": "420px"})

        self.temperature = slider("temperature", 1.0, 0.25, 5.0, 0.05)
        self.teacher_target = slider("teacher p(target)", 0.6, 0.01, 0.99)
        self.teacher_spread = slider("teacher tail spread", 1.0, 0.1, 10.0, 0.1)
        self.student_target = slider("student q(target)", 0.3, 0.01, 0.99)
        self.student_spread = slider("student tail spread", 3.0, 0.1, 10.0, 0.1)
        self.readout = w.HTML()
        self.readout.add_class("kdviz-readout")
        labels = ["target"] + [f"t{i}" for i in range(1, vocab)]
        self.figure = go.FigureWidget([go.Bar(name="teacher p", x=labels), go.Bar(name="student q", x=labels)],
                                      layout=dict(height=320, barmode="group", yaxis=dict(range=[0, 1]),
                                                  margin=dict(t=40, l=40, r=10, b=30)))
        self.sliders = [self.temperature, self.teacher_target, self.teacher_spread, self.student_target,
                        self.student_spread]
        for control in self.sliders:
            control.observe(lambda _: self.update(), "value")
        self.update()

    def update(self) -> ToyResult:
        self.result = toy_kd(teacher_target=self.teacher_target.value, student_target=self.student_target.value,
                             teacher_spread=self.teacher_spread.value, student_spread=self.student_spread.value,
                             temperature=self.temperature.value, vocab=self.vocab)
        r, t = self.result, self.temperature.value
        with self.figure.batch_update():
            self.figure.data[0].y, self.figure.data[1].y = r.p, r.q
            self.figure.layout.title = f"teacher p and student q at temperature T = {t:.2f}"
        note = ("T = 1: the sliders' own probabilities" if t == 1 else
                f"T = {t:.2f} softens both; the sliders set the probabilities at T = 1")
        self.readout.value = (
            f"<table style='border-spacing:14px 2px'><tr><td colspan=2><b>at temperature T = {t:.2f}</b><br>"
            f"<small>{note}</small></td></tr>"
            f"<tr><td>teacher p(target) at T</td><td>{r.p[0]:.4f} (slider {self.teacher_target.value:.2f})</td></tr>"
            f"<tr><td>student q(target) at T</td><td>{r.q[0]:.4f} (slider {self.student_target.value:.2f})</td></tr>"
            f"<tr><td>u = 1 - p(target) at T</td><td>{r.unc:.4f}</td></tr>"
            f"<tr><td>TKD</td><td>{r.tkd:.4f}</td></tr><tr><td>DKD</td><td>{r.dkd:.4f}</td></tr>"
            f"<tr><td>u &middot; DKD</td><td>{r.unc * r.dkd:.4f}</td></tr>"
            f"<tr><td><b>KL(p || q)</b></td><td><b>{r.kl:.4f}</b> = {r.tkd:.4f} + {r.unc * r.dkd:.4f}</td></tr>"
            "</table>")
        return r

    def widget(self) -> w.Widget:
        return w.VBox([w.HBox([w.VBox(self.sliders), self.readout]), self.figure])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget())
