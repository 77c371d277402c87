"""Does kvpress 0.5.5's own pipeline answer a question asked after PyramidKVPress compressed the context?

    .venv-kvpress/bin/python benchmarks/kvpress_pyramid_question.py runs/kvpress4k/prompts.jsonl --ratio 0.5

kvpress's query-agnostic protocol (its pipeline) prefills the context under the press, then runs the
question through the model on the compressed cache. PyramidKV leaves the layers with different lengths
once its pyramid is active (at 4k with window 64: ratios up to about 0.5; at 0.75 the schedule falls
back to one budget for every layer). This runs kvpress's pipeline (`kv-press-text-generation`) on the
first prompt of a side-by-side prompt file, once per press given, and prints each press's answer or the
error it raised, one line each (exit status 0 either way: the line is the result).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import kvpress
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", type=Path, help="a `kvpress_side_by_side.py prompts` file")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--presses", default="SnapKVPress,PyramidKVPress")
    args = parser.parse_args()
    prompt = json.loads(args.prompts.read_text().splitlines()[0])
    tok = AutoTokenizer.from_pretrained(prompt["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(prompt["model_dir"], dtype=torch.float32).eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    # The side-by-side prompt already carries the chat template and the pipeline applies it again
    # around it: this checks whether the question's forward runs, not the accuracy of the answer.
    context = tok.decode(prompt["context_ids"])
    question = tok.decode(prompt["question_ids"])
    for name in args.presses.split(","):
        press = getattr(kvpress, name)(compression_ratio=args.ratio, window_size=64)
        try:
            answer = pipe(context, question=question, press=press, max_new_tokens=12)["answer"]
            print(
                json.dumps(
                    {"press": name, "ratio": args.ratio, "answer": answer, "expected": prompt["answers"]}
                )
            )
        except Exception as exc:  # the result is whether it fails, and how
            print(json.dumps({"press": name, "ratio": args.ratio, "error": f"{type(exc).__name__}: {exc}"}))


if __name__ == "__main__":
    main()
