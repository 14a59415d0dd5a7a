"""Short distillation fine-tunes: `distill` (one call), `DistillTrainer` (a transformers Trainer), `DistillConfig`.

`kdviz.train.trainer` holds the trainer core, `kdviz.train.okd` OKD's online teacher,
`kdviz.train.evaluate` the held-out evaluation, `kdviz.train.checkpoints` checkpoint marks and
resume, `kdviz.train.signals` Ctrl-C handling and `kdviz.train.run` the `distill` orchestration.
"""

from kdviz.train.config import ATKD_SPLITS, LOSSES, DistillConfig
from kdviz.train.evaluate import EvalResult, evaluate_student
from kdviz.train.run import DistillResult, distill, split_data
from kdviz.train.trainer import DistillTrainer

__all__ = ["ATKD_SPLITS", "LOSSES", "DistillConfig", "DistillResult", "DistillTrainer", "EvalResult", "distill",
           "evaluate_student", "split_data"]
