"""Benchmark two task models against their anchors, both sides in one run, alternating, medians.

1. Text generation, decode: tokens/s of the text-generation task's decoder (the portable runtime
   running the tiny stateful LM exported as Apple's Mistral export is, int4 block-quantized and
   fp16) against transformers' eager model holding the same weights (`attn_implementation="eager"`):
   a loop of one-token calls with a KV cache (the same work, the leanest way transformers decodes),
   and `generate()` (its decode: the time for N tokens less the time for the first).
   Both decode greedily from the same prompt; the tokens are checked to be the same.
2. Depth estimation: one prediction of the tiny Depth Anything-shaped model (fp32 package) through
   `Model.predict` (PIL image in, as the task calls it) against its torch module on the same pixels.

    python bench/tasks_bench.py                      # 5 rounds, 48 new tokens, 200 depth calls
    python bench/tasks_bench.py --rounds 9 --tokens 32 --threads 2 --device cpu

Prints the median of each side and the ratio (higher is better for coreml-hub: the anchor's time
over ours). CPU by default; `--device cuda` runs both sides on a GPU (fp16 programs in fp16 for
the runtime, transformers in fp16).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import numpy as np


def _median_pair(rounds: int, ours: Callable[[], float], anchor: Callable[[], float]) -> tuple[float, float]:
    a, b = [], []
    for i in range(rounds):  # alternate which side goes first
        if i % 2 == 0:
            a.append(ours())
            b.append(anchor())
        else:
            b.append(anchor())
            a.append(ours())
    return statistics.median(a), statistics.median(b)


def bench_decode(weights: str, tokens: int, rounds: int, device: str) -> None:
    import torch

    from coreml_hub.mil import load_model
    from coreml_hub.testing import lm_models as lm
    from coreml_hub_plugins.text_generation import Decoder, contract_of
    from coreml_hub.tasks import read_bundle_spec

    package = lm.stateful_lm(weights)
    spec = read_bundle_spec(package)
    contract = contract_of(spec)
    assert contract is not None
    model = load_model(package, device=device)
    prompt = lm.load_tokenizer()("once upon a time there was a little robot")["input_ids"]
    new = min(tokens, contract.context - len(prompt))
    hf = lm.reference(package)
    hf.config._attn_implementation = "eager"
    dtype = torch.float16 if device == "cuda" else torch.float32
    hf = hf.to(device=device, dtype=dtype)

    def ours() -> tuple[float, list[int]]:
        decoder = Decoder(model, contract)
        logits = decoder.start(prompt)
        out = [int(np.argmax(logits))]
        start = time.perf_counter()
        for _ in range(new - 1):
            out.append(int(np.argmax(decoder.step(out[-1]))))
        return time.perf_counter() - start, out

    def theirs() -> tuple[float, list[int]]:
        from transformers import DynamicCache

        with torch.inference_mode():
            cache = DynamicCache()
            ids = torch.tensor([prompt], device=device)
            logits = hf(input_ids=ids, past_key_values=cache, use_cache=True).logits
            out = [int(logits[0, -1].argmax())]
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(new - 1):
                step = torch.tensor([[out[-1]]], device=device)
                logits = hf(input_ids=step, past_key_values=cache, use_cache=True).logits
                out.append(int(logits[0, -1].half().float().argmax()))
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start, out

    def generate(count: int) -> float:
        with torch.inference_mode():
            ids = torch.tensor([prompt], device=device)
            start = time.perf_counter()
            hf.generate(ids, max_new_tokens=count, do_sample=False, eos_token_id=None, pad_token_id=0)
            return time.perf_counter() - start

    _, mine = ours()  # warm both sides once
    _, anchor_tokens = theirs()
    same = mine == anchor_tokens
    ours_s, anchor_s = _median_pair(rounds, lambda: ours()[0], lambda: theirs()[0])
    # generate()'s decode: all tokens less the first one (the prefill), medians of alternating calls
    gen_s, first_s = _median_pair(max(3, rounds), lambda: generate(new), lambda: generate(1))
    gen_s -= first_s
    per = new - 1
    print(f"decode, stateful LM {weights} ({per} tokens after the first, prompt {len(prompt)} tokens, {device}):")
    print(f"  coreml-hub task decoder   {per / ours_s:8.1f} tokens/s   ({ours_s / per * 1000:.2f} ms/token)")
    print(f"  transformers eager, cache {per / anchor_s:8.1f} tokens/s   ({anchor_s / per * 1000:.2f} ms/token)")
    print(f"  transformers generate()   {per / gen_s:8.1f} tokens/s   ({gen_s / per * 1000:.2f} ms/token, eager)")
    print(f"  ratio (eager loop / ours) {anchor_s / ours_s:8.2f}x   ratio (generate / ours) {gen_s / ours_s:.2f}x   "
          f"same tokens: {same}")


def bench_depth(calls: int, rounds: int, device: str) -> None:
    import torch
    from PIL import Image

    from coreml_hub.mil import load_model
    from coreml_hub.testing import models

    width, height = models.DEPTH_SIZE
    model = load_model(models.depth("fp32"), device=device)
    module = models.depth_module().to(device)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    picture = Image.fromarray(pixels)
    tensor = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1).unsqueeze(0).to(device)

    def ours() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            model.predict({"image": picture})
        return (time.perf_counter() - start) / calls

    def theirs() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(calls):
                module(tensor).cpu().numpy()
        return (time.perf_counter() - start) / calls

    got = np.asarray(model.predict({"image": picture})["depth"], dtype=np.float32)
    with torch.inference_mode():
        want = module(tensor)[0, 0].cpu().numpy()
    ours(), theirs()
    ours_s, anchor_s = _median_pair(rounds, ours, theirs)
    print(f"depth, tiny Depth Anything-shaped model fp32 ({width}x{height}, {calls} calls per round, {device}):")
    print(f"  coreml-hub Model.predict (PIL in, image out) {ours_s * 1e6:9.1f} us/call")
    print(f"  torch module, eager                          {anchor_s * 1e6:9.1f} us/call")
    print(f"  ratio (torch time / ours) {anchor_s / ours_s:.2f}x   max |diff| {np.abs(got - want).max():.2e} "
          "(the output is a float16 image)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per decode round")
    parser.add_argument("--calls", type=int, default=200, help="depth predictions per round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both sides")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--only", choices=("decode", "depth"), default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}, rounds {args.rounds}")
    if args.only in (None, "decode"):
        for weights in ("int4", "fp16"):
            bench_decode(weights, args.tokens, args.rounds, args.device)
    if args.only in (None, "depth"):
        bench_depth(args.calls, args.rounds, args.device)


if __name__ == "__main__":
    main()
