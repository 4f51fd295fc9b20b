"""The env step of scripts/gpu_check.py (`python scripts/gpu_check.py --probe JSON`, run in its own process with the
wheels on the path): versions, the device, a bitsandbytes NF4 round trip, the varlen attention kernel's signature,
whether Liger imports, and on a GPU the bf16 dense matmul rate. torch and the rest are imported inside `probe`:
importing this module needs the standard library only.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import time
from pathlib import Path


def probe(path: Path) -> int:
    """Versions and the device; on a GPU also a bitsandbytes NF4 round trip and the bf16 matmul rate."""
    import importlib
    import importlib.metadata

    import torch

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "tokenizers",
                 "huggingface_hub", "pyarrow", "fsspec", "numpy", "pandas", "PIL"):
        try:
            module = importlib.import_module(name)
            versions[name] = getattr(module, "__version__", "?")
            print(f"{name} {versions[name]} from {Path(module.__file__).parent}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every import problem, keep probing
            versions[name] = f"import failed: {type(e).__name__}: {e}"
            print(f"{name}: {versions[name]}", flush=True)
    cuda = torch.cuda.is_available()
    info = {"versions": {"python": platform.python_version(), **versions}, "cuda": cuda,
            "torch_cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    device = "cuda" if cuda else "cpu"
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = smi.stdout.strip()
    try:
        import bitsandbytes.functional as F

        weight = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
        packed, state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        error = (F.dequantize_4bit(packed, state) - weight).abs().mean() / weight.abs().mean()
        info["bnb_nf4"] = f"relative error {float(error):.3f} on {packed.device.type}"
    except Exception as e:  # noqa: BLE001
        info["bnb_nf4"] = f"failed: {type(e).__name__}: {e}"
    try:  # the packed-attention kernel finetune uses on CUDA, and its signature (it changed between releases)
        import inspect

        from torch.nn.attention.varlen import varlen_attn
        info["varlen_attn"] = str(inspect.signature(varlen_attn))
    except Exception as e:  # noqa: BLE001
        info["varlen_attn"] = f"unavailable: {type(e).__name__}: {e}"
    try:
        import liger_kernel.transformers  # noqa: F401 - needs Triton
        info["liger_kernel"] = importlib.metadata.version("liger-kernel")
    except Exception as e:  # noqa: BLE001
        info["liger_kernel"] = f"unavailable: {type(e).__name__}: {str(e)[:200]}"
    if cuda:  # the MFU denominator, measured here rather than taken from a datasheet
        n = 8192
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        info["matmul_tflops"] = round(20 * 2 * n ** 3 / (time.perf_counter() - start) / 1e12)
    print(json.dumps(info, indent=2), flush=True)
    path.write_text(json.dumps(info, indent=2))
    return 0
