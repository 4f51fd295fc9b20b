"""Data: dataset rows in, chat rows out.

A format adapter (formats) turns one row into `{"messages", "images", "videos"}`; images and videos are checked and
decoded (images); rows are read from local files or the hub and decoded per batch (rows). Nothing here knows a
model: how many tokens a row becomes is the batching stage's question.
"""

from .formats import CHARTQA_SYSTEM_PROMPT, COLUMNS, FORMATS, RowError, expand_captions
from .images import BadMedia, image_size, load_image, load_video
from .rows import (PAIR_KEYS, ROW_ID, DataError, RowReader, chat_dataset, chat_rows, load_rows, read_row,
                   rename_columns, source_rows, with_reply)

__all__ = ["BadMedia", "CHARTQA_SYSTEM_PROMPT", "COLUMNS", "DataError", "FORMATS", "PAIR_KEYS", "ROW_ID", "RowError",
           "RowReader", "chat_dataset", "chat_rows", "expand_captions", "image_size", "load_image", "load_rows",
           "load_video", "read_row", "rename_columns", "source_rows", "with_reply"]
