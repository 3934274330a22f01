"""The Python API in a few lines: build an LLM, describe how to sample, generate, print.

    python examples/generate.py                                # the embedded tiny model (random weights)
    python examples/generate.py ~/models/Qwen2.5-0.5B-Instruct  # any Llama / Qwen2 / Qwen3 checkpoint directory
"""
import sys

from pagedattention import LLM, SamplingParams

model = sys.argv[1] if len(sys.argv) > 1 else None  # None = the embedded tiny model
llm = LLM(model)  # GPU when there is one (bf16, Numba kernels, CUDA graphs), else CPU (fp32, torch reference ops)

prompts = ["The capital of France is", "def fibonacci(n):", "PagedAttention stores the KV cache in"]
params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=32, seed=0)

for output in llm.generate(prompts, params):
    print(f"{output.prompt!r} -> {output.outputs[0].text!r}")
