"""llama.cpp, through the `gguf` extra: its converter and quantizer, and its runtime (tokenizer, mtmd) for checks.

One llama.cpp, pinned: llama-cpp-python vendors it, and its shared libraries are what the checks run. Its
source distribution also holds the converter (`convert_hf_to_gguf.py`, `conversion/`) and the `gguf-py` that
converter needs (the separately published `gguf` package is older and fails on it), but the built wheel does
not; `install_converter` copies them once, beside the environment, from that same source distribution:

    pip install 'finetune[gguf]'      # builds llama.cpp (about 4-6 minutes on 2 cores the first time; pip caches it)
    finetune export-gguf --setup      # the converter of that version, from PyPI or --sdist FILE (offline)

After that an export needs no network.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..recipe.sections import GGUF_OUTTYPES
from .merging import ExportError

#: The llama-cpp-python release whose llama.cpp converts, quantizes and checks (pyproject's `gguf` extra).
LLAMA_CPP_PYTHON = "0.3.36"
INSTALL = "pip install 'finetune[gguf]'"
SETUP = "finetune export-gguf --setup"
#: What the converter needs of the source distribution (under vendor/llama.cpp/).
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
#: Outtypes the converter writes itself; the others (GGUF_OUTTYPES) are quantized from its output by llama.cpp.
CONVERTED = ("f32", "f16", "bf16", "q8_0")
QUANTIZED = {t: f"LLAMA_FTYPE_MOSTLY_{t.upper()}" for t in GGUF_OUTTYPES if t not in CONVERTED}
OUTTYPES = GGUF_OUTTYPES


def runtime():
    """The `llama_cpp` module of the pinned version, or an error that says what to install."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"GGUF export needs llama.cpp: {INSTALL} (then {SETUP})") from None
    if llama_cpp.__version__ != LLAMA_CPP_PYTHON:
        raise ExportError(f"GGUF export is pinned to llama-cpp-python {LLAMA_CPP_PYTHON} (its converter and "
                          f"runtime are checked together); found {llama_cpp.__version__}: {INSTALL}")
    return llama_cpp


def converter_dir() -> Path:
    """Where the pinned converter lives: beside this environment (FINETUNE_LLAMA_CPP_CONVERTER overrides)."""
    override = os.environ.get("FINETUNE_LLAMA_CPP_CONVERTER")
    return Path(override) if override else Path(sys.prefix) / "share" / "finetune" / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def converter() -> Path:
    folder = converter_dir()
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise ExportError(f"llama.cpp's converter is not set up ({folder}): run `{SETUP}` once")
    return folder


def install_converter(sdist: str | Path | None = None) -> Path:
    """Copy the converter of the pinned version out of its source distribution (downloaded from the package index
    when `sdist` is not given) into `converter_dir()`."""
    runtime()
    folder = converter_dir()
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            print(f"[finetune] downloading llama-cpp-python {LLAMA_CPP_PYTHON}'s source distribution for its converter")
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                   "-q", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp],
                                  capture_output=True, text=True)
            if done.returncode:
                raise ExportError(f"could not download llama-cpp-python {LLAMA_CPP_PYTHON}'s source: "
                                  f"{done.stderr.strip()[-400:]} (offline: {SETUP} --sdist FILE)")
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        sdist = Path(sdist)
        if not sdist.is_file() or LLAMA_CPP_PYTHON not in sdist.name:
            raise ExportError(f"--sdist: expected llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz, got {sdist}")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        staging = Path(tmp) / "converter"
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in CONVERTER_FILES and (m.isfile() or m.isdir())]
            for member in members:
                member.name = member.name[len(prefix):]
            # the "data" filter (no links out, no special files) exists from Python 3.10.12 / 3.11.4
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(staging, members=members, **safe)
        missing = [name for name in CONVERTER_FILES if not (staging / name).exists()]
        if missing:
            raise ExportError(f"{sdist}: has no vendor/llama.cpp/{missing[0]}")
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), folder)
    return folder


def convert(model_dir: Path, out: Path, outtype: str, mmproj: bool = False, pre_tokenizer: str | None = None,
            text_architecture: str = "", renames: tuple[tuple[str, str], ...] = (),
            transposed: tuple[str, ...] = ()) -> Path:
    """One GGUF file (the language model, or with `mmproj` the vision encoder and projector) from a merged folder."""
    command = [sys.executable, "-m", "finetune.export.gguf_convert", str(converter())]
    if pre_tokenizer:
        command += ["--pre-tokenizer", pre_tokenizer]
    if text_architecture:
        command += ["--text-architecture", text_architecture]
    for old, new in renames:
        command += ["--rename", f"{old}={new}"]
    for suffix in transposed:
        command += ["--transpose", suffix]
    command += ["--", str(model_dir), "--outfile", str(out), "--outtype", outtype] + (["--mmproj"] if mmproj else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode or not out.is_file():
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        if "pre-tokenizer was not recognized" in done.stderr:
            last = ["llama.cpp does not know this tokenizer's pre-tokenizer (it would split text differently); "
                    "a llama.cpp release that lists it is needed"]
        raise ExportError(f"llama.cpp's converter failed on {model_dir} ({'mmproj' if mmproj else 'model'}, "
                          f"{outtype}): {last[0]}")
    return out


def quantize(source: Path, out: Path, outtype: str, threads: int | None = None) -> Path:
    """A k-quant (or q4_0) GGUF from a converted one, by llama.cpp's own `llama_model_quantize`."""
    llama_cpp = runtime()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED[outtype])
    params.nthread = threads or os.cpu_count() or 1
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # a line per tensor
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        raise ExportError(f"llama.cpp could not quantize {source} to {outtype}")
    return out


@dataclass
class Answer:
    tokens: list[int]
    text: str
    first_logprob: float  # log-probability of the first generated token
    image_tokens: int  # what the images took in the context


class Runtime:
    """A GGUF model (and its mmproj) loaded by llama.cpp on the CPU, for the export's checks."""

    def __init__(self, model: Path, mmproj: Path | None = None, image_tokens: tuple[int, int] | None = None,
                 n_ctx: int = 4096, threads: int | None = None):
        llama_cpp = runtime()
        from llama_cpp import mtmd_cpp
        from llama_cpp._utils import suppress_stdout_stderr

        self._lib, self._mtmd, self._quiet = llama_cpp, mtmd_cpp, suppress_stdout_stderr
        threads = threads or min(os.cpu_count() or 1, 8)
        self.llm = llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                   verbose=False)
        self.ctx = None
        if mmproj is not None:
            with suppress_stdout_stderr(disable=False):
                params = mtmd_cpp.mtmd_context_params_default()
                params.use_gpu, params.print_timings, params.warmup, params.n_threads = False, False, False, threads
                if image_tokens:
                    params.image_min_tokens, params.image_max_tokens = image_tokens
                self.ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, params)
            if self.ctx is None:
                raise ExportError(f"llama.cpp could not load {mmproj} with {model}")
        self.marker = mtmd_cpp.mtmd_default_marker().decode()

    def close(self) -> None:
        if self.ctx is not None:
            self._mtmd.mtmd_free(self.ctx)
            self.ctx = None
        self.llm.close()

    @property
    def chat_template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    def tokenize(self, text: str) -> list[int]:
        """As transformers' `encode(text, add_special_tokens=False)`: special tokens parsed, no BOS added."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def answer(self, prompt: str, images: list[bytes], max_new_tokens: int, add_bos: bool = True) -> Answer:
        """Greedy answer to a rendered prompt whose images stand at `self.marker`, each given as encoded bytes.
        `add_bos`: whether llama.cpp adds the model's BOS (where it has one); not when the template wrote it."""
        mtmd, lib, llm = self._mtmd, self._lib, self.llm
        with self._quiet(disable=False):
            bitmaps = [mtmd.mtmd_helper_bitmap_init_from_buf(
                self.ctx, (ctypes.c_uint8 * len(data)).from_buffer(bytearray(data)), len(data), False)
                for data in images]
        text = mtmd.mtmd_input_text()
        encoded = prompt.encode("utf-8")
        text.text, text.text_len, text.add_special, text.parse_special = encoded, len(encoded), add_bos, True
        chunks = mtmd.mtmd_input_chunks_init()
        image_tokens = 0
        try:
            with self._quiet(disable=False):
                status = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text),
                                            (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps), len(bitmaps))
            if status != 0:
                raise ExportError(f"llama.cpp could not read the prompt with its {len(images)} image(s) "
                                  f"(mtmd_tokenize: {status})")
            llm.reset()
            llm._ctx.kv_cache_clear()
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    tokens = [ids[j] for j in range(n.value)]
                    if min(tokens, default=0) < 0:  # mtmd looks its image wrappers up by text, in this vocabulary
                        raise ExportError("llama.cpp's image prompt for this model needs tokens its vocabulary does "
                                          "not have as single tokens (mtmd looked them up and found none)")
                    llm.eval(tokens)
                    continue
                image_tokens += mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                past = lib.llama_pos(0)
                with self._quiet(disable=False):
                    status = mtmd.mtmd_helper_eval_chunk_single(self.ctx, llm._ctx.ctx, chunk, llm.n_tokens, 0,
                                                                llm.n_batch, False, ctypes.byref(past))
                if status != 0:
                    raise ExportError(f"llama.cpp could not encode an image (mtmd: {status})")
                llm.n_tokens = past.value
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
        return self._greedy(max_new_tokens, image_tokens)

    def _greedy(self, max_new_tokens: int, image_tokens: int) -> Answer:
        import numpy as np

        llm, lib = self.llm, self._lib
        tokens, first = [], 0.0
        for step in range(max_new_tokens):
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
            token = int(logits.argmax())
            if step == 0:
                shifted = logits.astype(np.float64) - logits.max()
                first = float(shifted[token] - np.log(np.exp(shifted).sum()))
            if lib.llama_vocab_is_eog(llm._model.vocab, token):
                break
            tokens.append(token)
            llm.eval([token])
        return Answer(tokens, llm.detokenize(tokens).decode("utf-8", errors="replace").strip(), first, image_tokens)
