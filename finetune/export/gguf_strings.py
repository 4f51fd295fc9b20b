"""The strings a GGUF export's tokenizer-parity check tokenises with llama.cpp and transformers (finetune.export.gguf).

Where tokenizers part ways: special tokens (alone, glued to text, in rendered prompts), digit runs and number
formats (pre-tokenizers split digits differently), whitespace runs, unicode (scripts, emoji sequences, combining
marks), and whatever the run's own data holds.
"""

from __future__ import annotations

from ..batching.template import render
from ..data.formats import FORMATS, RowError
from ..data.rows import DataError, source_rows

UNICODE = [
    "café naïve façade", "日本語のテキストです", "中文字符和标点，。！", "한국어 문장입니다", "Ελληνικά γράμματα",
    "русский текст, ёжик", "עברית מימין לשמאל", "العربية من اليمين", "हिन्दी पाठ", "ภาษาไทย", "Tiếng Việt có dấu",
    "🚀📈✅ 😶‍🌫️ 👩‍👩‍👧", "e\u0301 combining", "\u00a0non-breaking\u00a0space", "ﬁ ligature ß ẞ", "x² + y³ = z⁴",
    "½ ¼ ¾ ⅓", "25°C 77°F", "— – - ‒", "“curly” ‘quotes’ «guillemets»", "naïve résumé coöperate", "Ωmega µ∑∫√∞≈≠",
]
FORMATTED = [
    "it's", "I'M", "we'VE", "don't", "tab\tseparated", "  two  spaces ", "\n\n\nnewlines\n", "trailing   ",
    "a\r\nb", "ALLCAPS", "camelCase", "snake_case_name", "http://example.com/a?b=c&d=e", "<html><b>x</b></html>",
    '{"json": [1, 2.5, null]}', "$1.5M", "€2,000.50", "-12.5%", "1e-5", "3.14159", "1,234,567", "2024-07-26",
    "12:30:45", "v1.2.3", "0x1F", "#ff0000", "100%", "(a+b)*c", "....", "!!!???", "```code```", "''''",
]


def tokenizer_strings(processor, family, recipe, rows: list[dict], data_rows: int = 500) -> list[str]:
    """A few thousand strings, deduplicated, in a fixed order."""
    tokenizer = processor.tokenizer
    special = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()))
    strings = [*special, *(f"a{t}b" for t in special), *(f" {t}\n{t}" for t in special)]
    # every number to 2,000: digit grouping is where pre-tokenizers differ most (single digits, runs of 1-3)
    strings += [str(n) for n in range(2000)] + [str(n) for n in (12345, 123456, 1234567, 98765432, 10**12)]
    strings += [f"{n / 8:.3f}" for n in range(40)] + [f"-{n}.{n}" for n in range(10)]
    strings += UNICODE + FORMATTED
    strings += [recipe.data.system_prompt or ""]
    texts = _data_texts(recipe, data_rows)
    strings += texts + [" " + t for t in texts[:200]]
    for row in rows:  # rendered conversations: the template's special tokens between real text
        strings.append(render(processor, row["messages"], family))
    return [s for s in dict.fromkeys(strings) if s]


def _data_texts(recipe, limit: int) -> list[str]:
    """Text parts of the first `limit` rows of the train and eval splits (adapted only: no image is read)."""
    cfg, texts = recipe.data, []
    for split in dict.fromkeys(s for s in (cfg.train_split, cfg.eval_split) if s):
        try:
            rows = source_rows(cfg, split)
        except (DataError, FileNotFoundError, ValueError):
            continue  # the data has moved: the other strings still run
        for i in range(min(limit, len(rows))):
            try:
                sample = FORMATS[cfg.format](rows[i], cfg.system_prompt)
            except (RowError, KeyError, TypeError, AttributeError):
                continue  # a row the run dropped too
            for message in sample["messages"]:
                content = message["content"]
                parts = [content] if isinstance(content, str) else [p.get("text", "") for p in content]
                texts += [p for p in parts if p]
    return texts
