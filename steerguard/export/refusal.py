"""The refusal head: AutoSteer's steered LM head `W + eps W S` as a d x d transform.

logits = h_N (W + eps W S)^T = (h_N R) W^T with R = I + eps S^T, so the refusal head shares the LM
head and costs one d x d matmul. S acts after the last layer, so the final hidden states of the
teacher-forced refusals do not depend on it: they are computed once, then S is fit on that cache."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .cpu import native_bfloat16
from .hidden import chat_ids, image_inputs


@dataclass
class RefusalHead:
    transform: np.ndarray        # R (d, d): refusal logits = (h_N @ R) @ W^T
    eps: float
    metrics: dict = field(default_factory=dict)

    @classmethod
    def train(cls, model, tokenizer, prompts: Sequence, targets: Sequence[str], eps: float = 0.1,
              epochs: int = 4, max_target_tokens: int = 48, lr: float = 2e-2, batch_positions: int = 1024,
              seed: int = 0, progress: bool = False, processor=None, bfloat16: bool | None = None) -> "RefusalHead":
        """Fit S (identity init) so that the frozen model, read through R, writes `targets` after `prompts`
        (texts, or image prompts read through `processor`). The logits are multiplied in bfloat16 where the CPU
        does that natively (`bfloat16` None) and the loss is taken in float32."""
        import torch
        from tqdm.auto import tqdm

        hidden, labels = refusal_cache(model, tokenizer, prompts, targets, max_target_tokens, progress, processor)
        weight = model.get_output_embeddings().weight.detach()              # (V, d)
        if native_bfloat16() if bfloat16 is None else bfloat16:
            weight = weight.to(torch.bfloat16)
        d = weight.shape[1]
        s = torch.nn.Parameter(torch.eye(d))
        opt = torch.optim.Adam([s], lr=lr)
        g = torch.Generator().manual_seed(seed)
        losses = []
        bar = tqdm(range(epochs), desc="refusal head", disable=not progress, unit="epoch")
        for _ in bar:
            perm = torch.randperm(len(labels), generator=g)
            total = 0.0
            for start in range(0, len(labels), batch_positions):
                idx = perm[start:start + batch_positions]
                h = hidden[idx]
                logits = ((h + eps * h @ s.T).to(weight.dtype) @ weight.T).float()
                loss = torch.nn.functional.cross_entropy(logits, labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            losses.append(total / len(labels))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        with torch.no_grad():
            base_loss = sum(torch.nn.functional.cross_entropy((hidden[i:i + batch_positions].to(weight.dtype) @ weight.T).float(),
                                                              labels[i:i + batch_positions], reduction="sum").item()
                            for i in range(0, len(labels), batch_positions)) / len(labels)
            transform = (torch.eye(d) + eps * s.T).numpy().astype(np.float32)
        return cls(transform=transform, eps=eps,
                   metrics={"targets": len(targets), "positions": int(len(labels)), "epochs": epochs,
                            "loss_per_epoch": [round(x, 4) for x in losses], "base_model_loss": base_loss})

    def save(self, folder: Path) -> None:
        np.save(folder / "refusal_transform.npy", self.transform)
        (folder / "refusal.json").write_text(json.dumps({"eps": self.eps, "metrics": self.metrics}, indent=1))

    @classmethod
    def load(cls, folder: Path) -> "RefusalHead":
        meta = json.loads((folder / "refusal.json").read_text())
        return cls(transform=np.load(folder / "refusal_transform.npy"), eps=meta["eps"], metrics=meta["metrics"])


CLOSING = "Is there something else I can help you with?"


def closed_refusal(target: str) -> str:
    """A training target cut to its refusal sentence, then a closing that names no topic. Targets that go
    on to offer help with something related ("I can explain how X works") teach the steered head a
    sentence frame that it then fills with the request's own topic ("I can help you write phishing
    messages"); one sentence and a fixed closing leave it nothing to fill."""
    from .data import judged_refusal

    first = re.split(r"(?<=[.!?])\s+", judged_refusal(target.strip()), maxsplit=1)[0]
    return f"{first} {CLOSING}"


def refusal_cache(model, tokenizer, prompts: Sequence, targets: Sequence[str], max_target_tokens: int,
                  progress: bool = False, processor=None):
    """Final (normed) hidden states at each position that predicts a target token, and those tokens.
    The target ends with the chat template's end-of-turn token, so the head learns to stop."""
    import torch
    from tqdm.auto import tqdm

    end = end_of_turn_ids(tokenizer)
    decoder = model.get_decoder()
    hidden, labels = [], []
    with torch.inference_mode():
        for prompt, target in tqdm(list(zip(prompts, targets)), desc="refusal cache", disable=not progress,
                                   unit="target"):
            t = (tokenizer.encode(target, add_special_tokens=False) + end[:1])[:max_target_tokens]
            if isinstance(prompt, str):
                p = chat_ids(tokenizer, prompt)
                final = decoder(input_ids=torch.tensor([p + t]), use_cache=False).last_hidden_state[0]
            else:   # the whole multimodal model places the image; its last hidden state is the normed one
                inputs = image_inputs(processor, prompt, t)
                p = inputs["input_ids"][0, :-len(t)]
                final = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1][0]
            hidden.append(final[len(p) - 1:len(p) + len(t) - 1].float())
            labels.append(torch.tensor(t))
    return torch.cat(hidden).clone(), torch.cat(labels)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the template's end marker first, then eos."""
    ids = []
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        i = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i is not None and i >= 0:
            ids.append(i)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
