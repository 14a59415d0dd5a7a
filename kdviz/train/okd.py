"""OKD's online teacher: a frozen teacher plus a small trainable adapter, trained at the same steps as the student.

kdviz's reading of Rao et al. (arXiv 2409.12512), whose module details are not public: a low-rank
residual adapter on the teacher's final hidden state is trained on cross-entropy to the labels
plus `pull` x KL(adapted teacher || current student); the student distils from the adapted
teacher. `OnlineTeacher` wraps a live teacher and is used wherever a teacher is (`kdviz.teachers`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdviz.distributed import world_size
from kdviz.files import write_with
from kdviz.losses import KDLoss, LossParts, TokenSplit, get_loss
from kdviz.models import final_hidden, output_head
from kdviz.teachers import LiveTeacher, TeacherSide, student_head

ADAPTER_WEIGHTS = "okd_adapter.safetensors"


class OnlineAdapter(nn.Module):
    """h + up(down(h)): a low-rank residual on the teacher's final hidden state (starts as identity)."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.up(self.down(hidden))  # (B, T, H)




class OnlineTeacher:
    """A live teacher whose final hidden state passes through a trainable `OnlineAdapter` (OKD).

    It is a `kdviz.teachers.Teacher`: `prepare` scores the adapted teacher without gradients, and
    `loss` adds the adapter's own loss (cross-entropy to the labels + `pull` x KL(adapted || student),
    the student detached) to the student's loss against the adapted teacher (the adapter detached).
    Evaluation compares the student with the frozen teacher itself.
    """

    top_k = None

    def __init__(self, live: LiveTeacher, *, rank: int, pull: float, device):
        self.live, self.pull = live, pull
        self.module, self.vocab_size, self.name = live.module, live.vocab_size, live.name
        self.adapter = OnlineAdapter(live.module.get_output_embeddings().weight.shape[1], rank).to(device)
        for parameter in self.adapter.parameters() if world_size() > 1 else ():
            dist.broadcast(parameter.data, 0)  # every process starts from rank 0's adapter, as DDP does
        self.pull_loss = get_loss("rkl")  # with the adapter in the student's seat: KL(adapted || student)

    def __getattr__(self, name):  # fingerprint, context, check_data, table_rows, top1, ...: the frozen teacher's
        return getattr(self.live, name)

    def _adapted(self, hidden: Tensor) -> Tensor:
        return self.adapter(hidden.float()).to(hidden.dtype)

    @torch.no_grad()
    def prepare(self, kd: KDLoss, batch: dict, *, linear: bool) -> TeacherSide:
        hidden = self.live.hidden(batch["input_ids"], batch["attention_mask"])
        head, bias = output_head(self.module, self.vocab_size)
        unc = kd.uncertainty(self._adapted(hidden), batch["labels"][:, 1:], teacher_head=head, teacher_bias=bias)
        return TeacherSide(unc, hidden=hidden)

    def loss(self, kd: KDLoss, student: nn.Module, side: TeacherSide, batch: dict, *, linear: bool,
             ce_weight: float, num_items: int, split: TokenSplit | None) -> LossParts:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
        t_head, t_bias = output_head(self.module, self.vocab_size)
        s_head, s_bias = student_head(student, self.vocab_size)
        s_hidden = final_hidden(student, ids, mask)[:, :-1]
        adapted = self._adapted(side.hidden)
        pull = self.pull_loss.linear(adapted, t_head, s_hidden.detach(), s_head.detach(), labels, ce_weight=1.0,
                                     kd_weight=self.pull, student_bias=t_bias, teacher_bias=s_bias,
                                     num_items=num_items)
        parts = kd.linear(s_hidden, s_head, adapted.detach(), t_head, labels, ce_weight=ce_weight, student_bias=s_bias,
                          teacher_bias=t_bias, num_items=num_items, split=split, teacher_unc=side.unc)
        return replace(parts, loss=parts.loss + pull.loss,
                       logs={"adapter_ce": float(pull.ce), "adapter_pull": float(pull.kd)})


def save_adapter(adapter: OnlineAdapter, checkpoint: Path) -> None:
    from safetensors.torch import save_file

    weights = {key: value.contiguous() for key, value in adapter.state_dict().items()}
    write_with(checkpoint / ADAPTER_WEIGHTS, lambda temp: save_file(weights, str(temp)), what="OKD adapter")


def load_adapter(adapter: OnlineAdapter, checkpoint: Path, *, device) -> None:
    from safetensors.torch import load_file

    path = checkpoint / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ValueError(f"The checkpoint {checkpoint} has no OKD adapter ({ADAPTER_WEIGHTS}): it was not written by an "
                         "OKD run. Resume with the loss it was written with.")
    adapter.load_state_dict(load_file(str(path), device=str(device)))
