"""Batching: chat rows -> model inputs, and everything that must agree with them.

template renders conversations and finds each reply's characters; encoding turns texts and images into tensors as
the processor does; collate labels the assistant replies only (preference: chosen and rejected pairs); lengths
measures a row from its image sizes alone; scan measures every row before training and decides which train;
packing packs whole samples into rows; streaming batches a stream as it is read.
"""

from .collate import IGNORE_INDEX, ChatCollator
from .encoding import encode
from .lengths import Measurer
from .packing import PackCollator, PackedRows, cached_plan, plan_packs
from .preference import PreferenceCollator
from .scan import DataRefused, ScanReport, scan_rows
from .streaming import StreamingRows, streamed
from .template import TemplateError, render, render_with_spans, template_traits

__all__ = ["ChatCollator", "DataRefused", "IGNORE_INDEX", "Measurer", "PackCollator", "PackedRows",
           "PreferenceCollator", "ScanReport", "StreamingRows", "TemplateError", "cached_plan", "encode",
           "plan_packs", "render", "render_with_spans", "scan_rows", "streamed", "template_traits"]
