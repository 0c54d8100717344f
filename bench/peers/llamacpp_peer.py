"""Peer: llama-cpp-python (llama.cpp CPU backend) on the demo's Q4_1 GGUF.

Manual greedy loop over ``Llama.eval``: one batched prefill of the prompt ids,
then one eval per new token.  The next token is the argmax of llama.cpp's last
logits row with EOS masked out, so exactly --new-tokens tokens come out.
"""

from __future__ import annotations

import argparse
import time

from _common import PEERS, Generation, parse_args, run_protocol


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=str(PEERS / "SmolLM2-135M-Instruct.Q4_1.gguf"), help="GGUF file")
    ap.add_argument("--n-ctx", type=int, default=2048, help="context size (prompt + new tokens must fit)")
    ap.add_argument("--n-batch", type=int, default=512, help="prefill batch size")
    ap.add_argument("--flash-attn", action="store_true", help="enable llama.cpp flash attention")


def main() -> None:
    args = parse_args(__doc__ or "", add_options)

    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=args.n_ctx,
        n_batch=args.n_batch,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        flash_attn=args.flash_attn,
        logits_all=False,
        verbose=False,
    )
    eos, n_vocab = llm.token_eos(), llm.n_vocab()

    def next_token() -> int:
        # Zero-copy view of llama.cpp's logits for the last evaluated token (rewritten by the next eval).
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        logits[eos] = -np.inf
        return int(logits.argmax())

    def generate(prompt: list[int], new_tokens: int) -> Generation:
        if len(prompt) + new_tokens > args.n_ctx:
            raise SystemExit(f"prompt + new tokens exceed --n-ctx {args.n_ctx}")
        llm.reset()  # n_tokens = 0: the next eval drops the old KV cache
        t_start = time.perf_counter()
        llm.eval(prompt)
        tokens = [next_token()]
        t_first = time.perf_counter()
        while len(tokens) < new_tokens:
            llm.eval(tokens[-1:])
            tokens.append(next_token())
        return Generation(tokens, t_start, t_first, time.perf_counter())

    name = "llamacpp-q4_1" + ("-fa" if args.flash_attn else "")
    run_protocol(name, args, generate, {"llama-cpp-python": llama_cpp.__version__})


if __name__ == "__main__":
    main()
