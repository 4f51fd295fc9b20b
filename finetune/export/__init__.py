"""Export: what leaves the machine after training.

merging folds a run's adapter into its base and saves a standalone checkpoint; parity checks that checkpoint
against base + adapter on real samples; card writes the model card from the run's own files; hub uploads an adapter
or a merged export to the Hugging Face Hub in one commit; serve starts vLLM on a run (serve_check compares its
answers with predict over HTTP).
"""

from .card import render_card, serving_warnings
from .hub import HubError, push
from .merging import DEFAULT_TOLERANCE, ExportError, ParityError, merge

__all__ = ["DEFAULT_TOLERANCE", "ExportError", "HubError", "ParityError", "merge", "push", "render_card",
           "serving_warnings"]
