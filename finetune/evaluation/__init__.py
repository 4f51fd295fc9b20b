"""Evaluation: what a trained model answers and how good that is.

inference loads a run folder, merged export or base model and generates with the training template; metrics scores
answers per task; heldout scores a split (`finetune eval`); in_training scores during and after a run; preference
scores chosen-over-rejected for DPO; conversation serves `finetune predict` and `finetune chat`; report and plots
write what a run leaves besides the adapter (recipe.yaml, run_summary.json, report.md, figures).
"""

from .conversation import predict, predict_file, system_prompt
from .heldout import Example, evaluate, examples, metric_for, score, write_eval
from .inference import Target, generate, load_target
from .metrics import DEFAULT_METRIC, METRICS, normalize
from .preference import pair_logps, preference_accuracy

__all__ = ["DEFAULT_METRIC", "Example", "METRICS", "Target", "evaluate", "examples", "generate", "load_target",
           "metric_for", "normalize", "pair_logps", "predict", "predict_file", "preference_accuracy", "score",
           "system_prompt", "write_eval"]
